"""What one `o2n-edge export` takes (:class:`ExportOptions`) and carries between its stages.

Why a state object: the export is a sequence of stages (``o2n_edge.export.build`` lists them
top to bottom) and each one needs a few results of the ones before it. Passing one typed
:class:`ExportState` keeps every stage's signature short and makes what a stage reads and
fills visible in one place, instead of a dozen locals threaded through one long function.

Torch is imported for type checking only: this module is imported before any model is built.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from o2n_edge.data import Dataset
    from o2n_edge.diffusion.run_dir import LoadedRun
    from o2n_edge.encoders.base import FeatureEncoder
    from o2n_edge.export.export_record import ExportReport
    from o2n_edge.profiles import Profile
    from o2n_edge.runtime.scoring import Reference, ScoringConfig

THRESHOLD_QUANTILE = 0.99  # of held-out good images' scores


@dataclass
class ExportOptions:
    """Everything `o2n-edge export` takes; defaults are the profile's."""

    category: str
    out: Path
    profile: str = "lite"
    data: Path | None = None
    dataset: str | None = None
    shots: int = 4
    seed: int = 0
    run_dir: Path | None = None
    runs_dir: Path = Path("runs")
    branches: str | None = None
    precision: str = "fp32"
    pool_size: int | None = None
    coreset_ratio: float | None = None
    bank_rows: int | None = None  # memory-bank row budget (None = the profile's bank_max_rows)
    image_size: int | None = None  # encoder input side (None = the profile's; lite: 224 is the fast setting)
    stats_weight: float | None = None  # global statistics branch weight (None = the profile's)
    brightness: str | None = None  # --brightness-tolerance: "off" or a fraction (None = the profile's)
    search_dims: int | None = None  # --search-dims (None = the profile's)
    search_precision: str | None = None  # --search-precision (None = the profile's)
    threshold_quantile: float = THRESHOLD_QUANTILE
    force: bool = False
    progress: bool = True
    work_dir: Path | None = None
    personalize_steps: int | None = None
    distill_steps: int | None = None
    base_model: Path | str | None = None  # sd15: local diffusers checkpoint or hub id
    encoder_checkpoint: Path | str | None = None  # sd15: local open_clip checkpoint, pretrained tag or hf-hub: id
    # sd15 student: None = the profile's LCM-LoRA (merged with the personalization LoRA); "" = LCD
    lcm_lora: str | None = None
    lcm_lora_scale: float = 1.0
    vae: str | None = None  # sd15: the transform's VAE: None/"full" = the checkpoint's, else a TAESD dir or hub id


@dataclass
class ExportPlan:
    """The resolved inputs: the profile with the options applied, and where things go."""

    profile: Profile
    branches: tuple[str, ...]
    config: ScoringConfig
    out: Path
    work: Path
    pool_size: int  # generated-pool images wanted (0: the shots-only bank)

    @property
    def needs_diffusion(self) -> bool:
        """Whether a personalized diffusion run is needed (the personalized branch or a pool)."""
        return "personalized" in self.branches or ("pool" in self.branches and self.pool_size > 0)


@dataclass
class ExportState:
    """The options, the plan and the shots, plus what each later stage fills in (None until then)."""

    opts: ExportOptions
    plan: ExportPlan
    dataset: Dataset
    shot_paths: list[Path]
    calib_paths: list[Path]
    encoder: FeatureEncoder
    shot_imgs: list[np.ndarray]
    walls: dict[str, float] = field(default_factory=dict)
    run: LoadedRun | None = None  # personalize
    pool_imgs: np.ndarray | None = None  # generate_pool
    normal_of: Callable[[np.ndarray], np.ndarray] | None = None  # build_reference (personalized branch)
    reference: Reference | None = None  # build_reference
    coreset: dict[str, Any] = field(default_factory=dict)  # apply_coreset
    calib_imgs: list[np.ndarray] = field(default_factory=list)  # calibrate_threshold
    calib_scores: np.ndarray | None = None
    threshold: float | None = None
    models: dict[str, tuple[ExportReport, Path]] = field(default_factory=dict)  # export_graphs
    manifest: dict[str, Any] = field(default_factory=dict)  # write_bundle: the manifest as written

    @property
    def size(self) -> int:
        """The scoring encoder's input side: every image is loaded at it."""
        return int(self.encoder.input_size)

    @property
    def draft(self) -> bool:
        """Whether JPEGs are decoded in draft mode (the profile's; recorded for the runtime)."""
        return bool(self.plan.profile.jpeg_draft)

    @property
    def brightness_range(self) -> "tuple[float, float] | None":
        """The (lo, hi) grey levels images are brought into (the shots' range widened by the
        profile's tolerance; o2n_edge.data.photometric), None when matching is off."""
        from o2n_edge.data.photometric import shots_range

        return shots_range(self.shot_imgs, self.plan.profile.brightness_tolerance)

    @property
    def personalized(self) -> bool:
        """Whether the bundle carries the one-to-normal transform (graphs, noise, scheduler)."""
        return self.run is not None and "personalized" in self.plan.branches

    def require_reference(self) -> Reference:
        """The reference built by ``build_reference`` (a stage run out of order is a bug)."""
        if self.reference is None:
            raise RuntimeError("export stage run before build_reference")
        return self.reference

    @contextlib.contextmanager
    def timed(self, key: str) -> Iterator[None]:
        """Record the block's wall time under ``walls[key]`` (seconds, 2 decimals) for the summary."""
        t = time.perf_counter()
        yield
        self.walls[key] = round(time.perf_counter() - t, 2)


def say(progress: bool, msg: str) -> None:
    """One progress line on stderr (rich), only when the user asked for progress."""
    if progress:
        from rich.console import Console

        Console(stderr=True).print(f"[bold cyan]export[/] {msg}", highlight=False)
