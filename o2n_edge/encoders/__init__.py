"""Scoring encoders: an image (and optionally text) tower behind one small contract.

:func:`build_encoder` turns an :class:`~o2n_edge.profiles.EncoderSpec` into a
:class:`FeatureEncoder` in eval mode; the profile decides which one (open_clip for ``tiny`` and
``sd15``, ImageNet EfficientNet-Lite0/1/2 for ``lite``), so callers never branch on the model.
"""

from __future__ import annotations

from ..profiles import EncoderSpec
from .base import FeatureEncoder, encode_images, preprocess_numpy, resize_uint8

ENCODER_KINDS = ("open_clip", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")

__all__ = [
    "ENCODER_KINDS",
    "FeatureEncoder",
    "build_encoder",
    "encode_images",
    "preprocess_numpy",
    "resize_uint8",
]


def build_encoder(spec: EncoderSpec) -> FeatureEncoder:
    """Build the encoder ``spec`` names, in eval mode with gradients off (it is never trained)."""
    if spec.kind == "open_clip":
        from .clip import OpenClipEncoder

        encoder: FeatureEncoder = OpenClipEncoder(spec)
    elif spec.kind.startswith("efficientnet_lite") and spec.kind in ENCODER_KINDS:
        from .efficientnet import EfficientNetLiteEncoder

        encoder = EfficientNetLiteEncoder(spec)
    else:
        choices = ", ".join(ENCODER_KINDS)
        raise ValueError(f"unknown encoder kind {spec.kind!r}: choose one of {choices}")
    encoder.eval()
    encoder.requires_grad_(False)
    return encoder
