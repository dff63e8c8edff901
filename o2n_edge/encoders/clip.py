"""open_clip image (+ text) tower as the scoring encoder of the ``tiny`` and ``sd15`` profiles.

Outputs, from a single pass through the vision transformer:

- ``"patch"``: the mean of a few intermediate blocks' output tokens (blocks at 1/2 and 3/4 of
  the depth; e.g. blocks 6 and 9 of 12, 12 and 18 of 24), each layer-normalized without affine
  parameters so that no layer dominates by scale. Intermediate CLIP tokens keep local
  structure that the last block (trained only to feed the CLS token) washes out, which is why
  few-shot anomaly detectors (WinCLIP, APRIL-GAN, AnomalyCLIP) take their patch features there.
- ``"patch_text"``: the final block's patch tokens through ``ln_post`` and ``proj``
  (MaskCLIP-style dense features in the joint space), L2-normalized, for the text branch.
- ``"global"``: the L2-normalized image embedding, identical to ``encode_image(normalize=True)``.

Weights come from ``spec.checkpoint``: a local file or open_clip ``local-dir`` folder, a
pretrained tag of the model (``laion400m_e32``) or an ``hf-hub:org/name`` id, the last two
resolved through the Hugging Face cache (:mod:`o2n_edge.hub`); an empty checkpoint means a seeded random init, which the tests and
benchmarks use (``model_name="tiny"`` builds a ~0.5M-parameter CLIP of the same classes).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from pathlib import Path

from .._lazy import require
from ..profiles import EncoderSpec
from .base import FeatureEncoder, torch

F = torch.nn.functional
LOG = logging.getLogger(__name__)

TINY_MODEL_NAME = "tiny"
TINY_EMBED_DIM = 32
TINY_VISION_CFG = {"patch_size": 8, "width": 64, "layers": 2, "head_width": 32, "mlp_ratio": 4.0}
TINY_TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
TINY_IMAGE_SIZE = 64
# Depth fractions of the blocks averaged into "patch" (index = ceil(f * layers) - 1).
PATCH_LAYER_FRACTIONS = (0.5, 0.75)
# Above this many parameters a random init is worthless for scoring: warn about it.
RANDOM_INIT_WARN_PARAMS = 5_000_000
CHECKPOINT_HINT = "set the encoder checkpoint (EncoderSpec.checkpoint / --encoder-checkpoint)"


def patch_layer_indices(num_layers: int) -> tuple[int, ...]:
    """Block indices whose outputs are averaged into the "patch" feature (sorted, unique)."""
    last = num_layers - 1
    idx = {max(0, min(last, math.ceil(f * num_layers) - 1)) for f in PATCH_LAYER_FRACTIONS}
    return tuple(sorted(idx))


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's RNG for a random init without disturbing the caller's RNG stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


@contextlib.contextmanager
def mha_fastpath_disabled() -> Iterator[None]:
    """Turn off nn.MultiheadAttention's fused fast path (``_native_multi_head_attention``).

    In eval mode without grad, PyTorch routes attention through a fused kernel that the ONNX
    exporter cannot translate (a known open_clip export trap); tracing must see the plain ops. The
    encoder's own export hook and the generic exporter (``export.onnx_export``) both use this.
    """
    mha = getattr(torch.backends, "mha", None)
    if mha is None:  # a torch without the switch has no fast path to avoid
        yield
        return
    previous = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(previous)


def _build_tiny(spec: EncoderSpec) -> torch.nn.Module:
    """The tiny CLIP: built from a config dict (nothing written into open_clip's registry)."""
    open_clip = require("open_clip", "the open_clip encoder")
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    image_size = int(spec.image_size or TINY_IMAGE_SIZE)
    vision = CLIPVisionCfg(image_size=image_size, **TINY_VISION_CFG)
    text = CLIPTextCfg(**TINY_TEXT_CFG)
    with _seeded(spec.seed):
        model = CLIP(embed_dim=TINY_EMBED_DIM, vision_cfg=vision, text_cfg=text)
    if spec.checkpoint:
        path = _checked_file(spec.checkpoint)
        open_clip.load_checkpoint(model, str(path), strict=True)
    return model


def _checked_file(checkpoint: str) -> Path:
    """A checkpoint path that must exist locally; the error says which setting to fix."""
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"open_clip checkpoint not found: {path} ({CHECKPOINT_HINT}: a local file/dir, "
                                "a pretrained tag such as laion400m_e32, or an hf-hub:org/name id)")
    return path


def _hub_local_dir(hub_id: str) -> Path:
    """``hf-hub:org/name`` -> its cached snapshot (config + weights), for open_clip's ``local-dir:``."""
    from o2n_edge.hub import OPEN_CLIP_PATTERNS, snapshot

    repo = hub_id.removeprefix("hf-hub:")
    path = snapshot(repo, OPEN_CLIP_PATTERNS, "open_clip model", ("open_clip_config.json",))
    if not any((path / f).is_file() for f in OPEN_CLIP_PATTERNS[1:]):
        from o2n_edge.hub import _missing

        raise _missing("open_clip model", repo, OPEN_CLIP_PATTERNS, "no weights file")
    return path


def _pretrained_file(name: str, tag: str) -> Path:
    """An open_clip pretrained tag (e.g. ``laion400m_e32``) -> its weights file in the hub cache.

    open_clip itself downloads through ``hf_hub_download``; resolving the file here first means
    ``HF_HUB_OFFLINE``/``HF_HOME`` as set now are obeyed and a missing file names its fetch command.
    """
    import os

    from o2n_edge.hub import _missing, hub_file

    open_clip = require("open_clip", "the open_clip encoder")
    cfg = open_clip.get_pretrained_cfg(name, tag)
    hub = cfg.get("hf_hub", "") if cfg else ""
    if not hub:
        raise FileNotFoundError(f"open_clip {name} has no hub weights for tag {tag!r}: pass a local checkpoint")
    repo, filename = os.path.split(hub)  # open_clip's convention: "org/name/" or "org/name/file"
    names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    last: Exception | None = None
    for fname in names:
        try:
            return hub_file(repo, fname, f"open_clip {name} ({tag})")
        except FileNotFoundError as exc:
            last = exc
    raise _missing(f"open_clip {name} ({tag})", repo, names[:1], type(last).__name__)


def _build_named(spec: EncoderSpec) -> torch.nn.Module:
    """A named open_clip architecture with weights from a local path, a pretrained tag or an hf-hub id.

    No checkpoint: a seeded random init (tests, and the real-size dry run).
    """
    open_clip = require("open_clip", "the open_clip encoder")
    name = spec.model_name
    kwargs = {"pretrained_text": False, "pretrained_image": False, "device": "cpu"}
    if spec.image_size:
        kwargs["force_image_size"] = int(spec.image_size)
    ckpt = spec.checkpoint
    if name.startswith("hf-hub:") and not ckpt:
        return open_clip.create_model(f"local-dir:{_hub_local_dir(name)}", **kwargs)
    if ckpt.startswith("hf-hub:"):
        return open_clip.create_model(f"local-dir:{_hub_local_dir(ckpt)}", **kwargs)
    if ckpt and not Path(ckpt).expanduser().exists() and ckpt in open_clip.list_pretrained_tags_by_model(name):
        return open_clip.create_model(name, pretrained=str(_pretrained_file(name, ckpt)), **kwargs)
    if ckpt:
        path = _checked_file(ckpt)
        if path.is_dir():  # an open_clip "local-dir" export: config + weights side by side
            return open_clip.create_model(f"local-dir:{path}", **kwargs)
        return open_clip.create_model(name, pretrained=str(path), **kwargs)
    with _seeded(spec.seed):
        model = open_clip.create_model(name, **kwargs)
    n_params = sum(p.numel() for p in model.parameters())
    if n_params > RANDOM_INIT_WARN_PARAMS:
        LOG.warning("open_clip %s has no checkpoint: random init (seed %d), scores are "
                    "meaningless; %s", name, spec.seed, CHECKPOINT_HINT)
    return model


class OpenClipEncoder(FeatureEncoder):
    """An open_clip CLIP whose vision tower yields patch, global and text-space patch features."""

    output_names = ("patch", "global", "patch_text")

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        open_clip = require("open_clip", "the open_clip encoder")
        self.spec = spec
        is_tiny = spec.model_name == TINY_MODEL_NAME
        self.model = _build_tiny(spec) if is_tiny else _build_named(spec)
        visual = self.model.visual
        from open_clip.transformer import VisionTransformer

        if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None \
                or visual.proj is None:
            raise NotImplementedError(
                f"open_clip model {spec.model_name!r}: only plain ViT image towers (no timm "
                "tower, no attentional pooler) provide patch tokens here"
            )
        self.image_size = int(visual.image_size[0])
        if spec.image_size and int(spec.image_size) != self.image_size:
            raise ValueError(f"model image size {self.image_size} != spec {spec.image_size}")
        self.mean = tuple(float(v) for v in (getattr(visual, "image_mean", None)
                                             or open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(float(v) for v in (getattr(visual, "image_std", None)
                                            or open_clip.OPENAI_DATASET_STD))
        self.has_text = True
        self.grid = (int(visual.grid_size[0]), int(visual.grid_size[1]))
        self.patch_dim = int(visual.transformer.width)
        self.global_dim = int(visual.proj.shape[1])
        self.patch_layers = patch_layer_indices(len(visual.transformer.resblocks))
        self.tokenizer = (open_clip.get_tokenizer("ViT-B-32") if is_tiny
                          else open_clip.get_tokenizer(spec.model_name))
        self.eval()

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B,3,S,S) normalized pixels -> patch (B,h,w,width), global (B,D), patch_text (B,h,w,D).

        The fused attention fast path is switched off while tracing so the export sees plain ops.
        """
        exporting = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        ctx = mha_fastpath_disabled() if exporting else contextlib.nullcontext()
        with ctx:
            return self._forward(pixels)

    def _forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        visual = self.model.visual
        h, w = self.grid
        x = visual._embeds(pixels)
        tower = visual.transformer
        if not tower.batch_first:
            x = x.transpose(0, 1)
        taken = []
        for i, block in enumerate(tower.resblocks):
            x = block(x)
            if i in self.patch_layers:
                taken.append(x.transpose(0, 1) if not tower.batch_first else x)
        if not tower.batch_first:
            x = x.transpose(0, 1)
        width = self.patch_dim
        mids = [F.layer_norm(t[:, 1:], (width,)) for t in taken]
        patch = torch.stack(mids, dim=0).mean(dim=0) if len(mids) > 1 else mids[0]
        patch = patch.reshape(-1, h, w, width)
        pooled, _ = visual._pool(x)
        image = F.normalize(pooled @ visual.proj, dim=-1)
        dense = visual.ln_post(x[:, 1:]) @ visual.proj
        dense = F.normalize(dense, dim=-1).reshape(-1, h, w, self.global_dim)
        return {"patch": patch, "global": image, "patch_text": dense}

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> (N, global_dim) L2-normalized text embeddings (computed once, at export)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("no prompts given")
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(list(prompts)).to(device)
        return self.model.encode_text(tokens, normalize=True)
