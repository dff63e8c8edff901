"""What one inspection returns, and the interface the CLI and the server program against.

The server, `o2n-edge infer` and the benchmarks only see :class:`Inspector`, so the same code
serves an ONNX Runtime pipeline, a TensorRT one, or a test double.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np


@dataclass
class InspectResult:
    """One image's verdict; maps are at the scoring image size."""

    score: float
    decision: bool  # True = anomalous (score > threshold)
    threshold: float
    timings_ms: dict[str, float] = field(default_factory=dict)  # per stage + "total"
    anomaly_map: np.ndarray | None = None  # (S,S) float32, standardized fused map
    query: np.ndarray | None = None  # (S,S,3) uint8, the query as scored
    normal: np.ndarray | None = None  # (S,S,3) uint8, its normal version (None without that branch)

    def to_json(self) -> dict:
        """The JSON answer (no arrays)."""
        return {
            "score": float(self.score),
            "decision": "anomalous" if self.decision else "normal",
            "anomalous": bool(self.decision),
            "threshold": float(self.threshold),
            "timings_ms": {k: round(float(v), 3) for k, v in self.timings_ms.items()},
        }


class Inspector(Protocol):
    """Anything that turns decoded RGB images into verdicts."""

    bundle_hash: str  # sha256 of the manifest: which bundle made a decision
    threshold: float
    image_size: int

    def inspect(self, image: np.ndarray) -> InspectResult:
        """One uint8 (H,W,3) RGB image -> verdict."""
        ...

    def inspect_batch(self, images: Sequence[np.ndarray]) -> list[InspectResult]:
        ...
