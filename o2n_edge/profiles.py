"""Model profiles: one place that says which networks, sizes and defaults each profile uses.

Every stage (encoders, personalization, distillation, export, runtime) reads its settings from
here. `tiny` (tests/CI) and `sd15` (production on GPU) run the whole One-to-Normal path and differ
only in data; `lite` (real scores on any CPU) is the memory-bank detector: it has no diffusion
model (``Profile.diffusion is None``), so its only branch is the shots' memory bank (``pool``)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

PROFILE_NAMES = ("tiny", "lite", "sd15")
BRANCHES = ("personalized", "pool", "text")


@dataclass(frozen=True)
class EncoderSpec:
    """The vision (and optionally text) encoder used for scoring."""

    kind: str  # "open_clip" | "efficientnet_lite0" | "efficientnet_lite1" | "efficientnet_lite2"
    image_size: int  # square input side of the encoder in pixels (one tile's side when tiled)
    model_name: str = ""  # open_clip model name, or a tiny built-in config name
    checkpoint: str = ""  # local checkpoint path ("" = seeded init for tiny / bundled weights)
    seed: int = 0
    # EfficientNet-Lite only: backbone stages concatenated into patch features (() = the
    # encoder's default) and the PatchCore neighbourhood-aggregation kernel.
    layers: tuple[int, ...] = ()
    aggregation: int = 3
    # EfficientNet-Lite only: the global feature from the classifier head (conv_head after the
    # last stage), or, when False, the mean of the patch features, so the network stops after
    # the last patch stage: the head is 37% of Lite0's multiply-adds (20% of its time at 448 px),
    # wasted by a profile that gives the global term no weight.
    global_from_head: bool = True
    # Overlapping tiles per side (1 = the whole image at ``image_size``) and their overlap: a
    # large image is resized to o2n_edge.data.tiling's ``side`` and cut into tiles of image_size.
    tiles: int = 1
    tile_overlap: float = 0.25

    @property
    def input_size(self) -> int:
        """Side (pixels) every image is resized to before encoding: the scoring map's side."""
        from o2n_edge.data.tiling import tile_layout

        return tile_layout(self.image_size, self.tiles, self.tile_overlap).side


@dataclass(frozen=True)
class DiffusionSpec:
    """The diffusion model that is personalized, distilled and run by the transform."""

    kind: str  # "tiny" | "sd15"
    image_size: int  # pixel side the diffusion model works at
    strength: float = 0.3  # SDEdit noise strength of the one-to-normal transform
    steps: int = 4  # few-step (LCM) denoising steps of the distilled model
    personalize_steps: int = 200  # default personalization budget (optimizer steps)
    distill_steps: int = 200  # default consistency-distillation budget
    pool_size: int = 8  # generated anomaly-free images added to the memory bank
    base_model: str = ""  # sd15: local diffusers checkpoint dir
    lcm_lora: str = ""  # sd15: LCM-LoRA merged by default (local path or hub id; "" = distil by LCD)
    seed: int = 0


@dataclass(frozen=True)
class Profile:
    """Everything a profile fixes; CLI options override single fields via :func:`dataclasses.replace`."""

    name: str
    encoder: EncoderSpec
    # The One-to-Normal diffusion model; None = a memory-bank detector (lite), which has no
    # personalized branch and no generated pool.
    diffusion: DiffusionSpec | None
    # Fusion weights of the triplet branches (the paper's 1.0 / 0.5).
    weights: dict[str, float] = field(
        default_factory=lambda: {"personalized": 1.0, "pool": 1.0, "text": 0.5}
    )
    has_text: bool = True
    topk_fraction: float = 0.01  # image score = mean of the top 1% of the fused map
    global_weight: float = 0.5  # weight of the global-feature score in the image score
    smoothing_sigma: float = 4.0  # gaussian sigma (pixels at image size) for anomaly maps
    stats_weight: float = 0.0  # global statistics branch (scoring.feature_stats); 0 = off
    # Pool map standardized per ring of grid cells from the edge, over this fraction of the grid
    # side (scoring.ScoringConfig.border_fraction); 0 = one constant for the whole map.
    border_fraction: float = 0.0
    # Nearest-row search in the bank's first N principal axes (scoring.ScoringConfig.search_dims);
    # 0 = every dimension.
    search_dims: int = 0
    # Nearest-row search arithmetic on a CPU (scoring.ScoringConfig.search_precision): "float32"
    # (exact) or "int8" (the row chosen in int8, its distance exact); a GPU always uses float32.
    search_precision: str = "float32"
    # Statistics branch from one shot scaled at least by how its statistics vary between the
    # shot's regions (scoring.ScoringConfig.stats_region_floor).
    stats_region_floor: bool = False
    # Brightness matching (o2n_edge.data.photometric): an image darker or brighter than the
    # shots' range widened by this fraction is brought back to its edge by one gain before
    # encoding, so lighting that drifts is not a defect; None = off.
    brightness_tolerance: float | None = None
    # Decode JPEGs at a reduced DCT scale that still covers the scoring size (PIL draft mode);
    # recorded in the bundle so the runtime decodes exactly as the export did.
    jpeg_draft: bool = False
    prompt_template: str = "a photo of sks {category}"
    # Export default: keep this fraction of the memory bank (greedy k-center); None = the whole
    # bank up to ``bank_max_rows``. lite uses 0.1: measured on hazelnut, tire and
    # textile it costs no image AUROC and cuts the per-image time 2.6x
    # (benchmarks/results/variants_lite.md), at up to 2.4 points of pixel AUROC (tire).
    coreset_ratio: float | None = None
    # Row budget of the memory bank, applied after the ratio in eval and export alike: the bank,
    # and with it the per-image search, stays bounded however many good images are given. The
    # default of 50,000 was export's fixed bound. lite's 8,192 is above its largest bank at
    # today's shot counts (4 shots x 6 views x 3,136 patches at 448 px x 0.1 = 7,526 rows), so
    # 1/2/4 shots keep exactly the bank the ratio gives; the cap bites only beyond that (5+
    # shots at 448 px, 18+ at 224). ``--bank-rows`` overrides it.
    bank_max_rows: int = 50_000
    # Branches used when --branches is not given; None = every branch the profile has. The
    # others stay available through --branches.
    default_branch_names: tuple[str, ...] | None = None

    @property
    def has_diffusion(self) -> bool:
        """Whether the profile runs One-to-Normal (personalize, distil, transform, generated pool)."""
        return self.diffusion is not None

    @property
    def branches(self) -> tuple[str, ...]:
        """Every branch this profile can run: personalized only with a diffusion model, text only
        where the encoder has a text tower."""
        return tuple(b for b in BRANCHES
                     if (b != "text" or self.has_text) and (b != "personalized" or self.has_diffusion))

    def require_diffusion(self, what: str = "") -> DiffusionSpec:
        """The diffusion spec, or a one-line error saying which profiles have one.

        Every diffusion command calls this first, so ``personalize --profile lite`` fails at once
        with the fix instead of deep inside model building.
        """
        if self.diffusion is None:
            prefix = f"{what}: " if what else ""
            raise ValueError(f"{prefix}profile {self.name!r} has no diffusion model (it is the memory-bank "
                             f"detector): use --profile tiny or sd15")
        return self.diffusion

    @property
    def default_branches(self) -> tuple[str, ...]:
        """The branches a command runs when --branches is not given."""
        return self.default_branch_names or self.branches


PROFILES: dict[str, Profile] = {
    "tiny": Profile(
        name="tiny",
        encoder=EncoderSpec(kind="open_clip", image_size=64, model_name="tiny"),
        diffusion=DiffusionSpec(
            kind="tiny", image_size=32, steps=2, strength=0.5, personalize_steps=30,
            distill_steps=20, pool_size=4,
        ),
        has_text=True,
    ),
    "lite": Profile(
        name="lite",
        # Detection core v4 (docs/decisions/lite-detection-core.md; each factor measured alone in
        # benchmarks/results/one_factor.md): Lite0 at 448 px so a defect of a few pixels spans
        # grid cells; the pool map standardized per border ring (15% of the grid side), without
        # which the border sets every image's score; the global statistics branch at 0.5 for
        # whole-image defects, scaled from one shot by the spread between its own regions; no
        # global cosine term, so no classifier head; brightness kept within the shots' range
        # ±5%, so drifting lighting is not a defect. `--image-size 224` is the faster setting.
        encoder=EncoderSpec(kind="efficientnet_lite0", image_size=448, global_from_head=False),
        diffusion=None,
        has_text=False,
        coreset_ratio=0.1,
        bank_max_rows=8192,
        jpeg_draft=True,
        stats_weight=0.5,
        stats_region_floor=True,
        brightness_tolerance=0.05,
        global_weight=0.0,
        border_fraction=0.15,
        # The bank searched in int8 on a CPU, 4 candidates re-ranked in float32: the same scores
        # to 0.05 points on every shared set, the search 55 -> 29 ms per image (benchmarks/results/
        # accuracy_lite_v5_int8.md, int8_search.md); a GPU searches in float32.
        search_precision="int8",
        # On a CPU the memory bank does the work: no variant of a CPU-sized diffusion transform
        # beat the shots-only bank on two of hazelnut, tire and textile
        # (benchmarks/results/ablation_lite_v2.md), so lite has no diffusion model at all.
        default_branch_names=("pool",),
    ),
    "sd15": Profile(
        name="sd15",
        encoder=EncoderSpec(kind="open_clip", image_size=240, model_name="ViT-B-16-plus-240"),
        diffusion=DiffusionSpec(
            kind="sd15", image_size=512, steps=4, strength=0.3, personalize_steps=800,
            distill_steps=1000, pool_size=30, lcm_lora="latent-consistency/lcm-lora-sdv1-5",
        ),
        has_text=True,
    ),
}


def get_profile(name: str, **overrides: object) -> Profile:
    """Look up a profile by name; unknown names are a clear error listing the valid ones."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}: choose one of {', '.join(PROFILE_NAMES)}")
    profile = PROFILES[name]
    return replace(profile, **overrides) if overrides else profile


MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 1024


def with_image_size(profile: Profile, size: int) -> Profile:
    """``profile`` scoring at ``size`` px (``--image-size``): the speed/small-defect trade-off."""
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise ValueError(f"--image-size must be an integer from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} px, got {size!r}")
    if profile.encoder.kind == "open_clip" and profile.encoder.model_name != "tiny":
        raise ValueError(f"--image-size applies to the EfficientNet-Lite profiles; {profile.name!r} uses "
                         f"{profile.encoder.model_name} at its fixed {profile.encoder.image_size} px")
    return replace(profile, encoder=replace(profile.encoder, image_size=size))


def with_stats_weight(profile: Profile, weight: float) -> Profile:
    """``profile`` with the global statistics branch at ``weight`` (``--stats-weight``; 0 = off).

    The branch finds whole-image defects (a wrong weave, a colour cast) that no patch gives away
    and costs a few points where good parts vary globally (lighting): the user who knows the
    category can set it.
    """
    if not 0.0 <= float(weight) <= 10.0:
        raise ValueError(f"--stats-weight must be between 0 (off) and 10, got {weight}")
    return replace(profile, stats_weight=float(weight))


def with_brightness_tolerance(profile: Profile, text: str) -> Profile:
    """``profile`` with ``--brightness-tolerance``: ``off`` or a fraction in [0, 1]."""
    if str(text).strip().lower() in ("off", "none"):
        return replace(profile, brightness_tolerance=None)
    try:
        tol = float(text)
    except ValueError:
        tol = -1.0
    if not 0.0 <= tol <= 1.0:
        raise ValueError(f"--brightness-tolerance must be 'off' or a fraction from 0 to 1, got {text!r}")
    return replace(profile, brightness_tolerance=tol)


def with_options(profile: Profile, *, image_size: int | None = None, stats_weight: float | None = None,
                 bank_rows: int | None = None, brightness: str | None = None,
                 search_dims: int | None = None, search_precision: str | None = None) -> Profile:
    """The user's ``--image-size`` / ``--stats-weight`` / ``--bank-rows`` / ``--brightness-tolerance``
    / ``--search-dims`` / ``--search-precision`` applied in one order (``eval`` and ``export`` share it, so a bundle scores
    as its eval did)."""
    if bank_rows is not None:
        if isinstance(bank_rows, bool) or not isinstance(bank_rows, int) or bank_rows < 1:
            raise ValueError(f"--bank-rows must be a positive number of memory-bank rows, got {bank_rows!r}")
        profile = replace(profile, bank_max_rows=bank_rows)
    if image_size is not None:
        profile = with_image_size(profile, image_size)
    if stats_weight is not None:
        profile = with_stats_weight(profile, stats_weight)
    if brightness is not None:
        profile = with_brightness_tolerance(profile, brightness)
    if search_dims is not None:
        if isinstance(search_dims, bool) or not isinstance(search_dims, int) or search_dims < 0:
            raise ValueError(f"--search-dims must be 0 (every dimension) or a positive number of axes, got {search_dims!r}")
        profile = replace(profile, search_dims=search_dims)
    if search_precision is not None:
        from .runtime.scoring import SEARCH_PRECISIONS

        if search_precision not in SEARCH_PRECISIONS:
            raise ValueError(f"--search-precision must be one of {', '.join(SEARCH_PRECISIONS)}, "
                             f"got {search_precision!r}")
        profile = replace(profile, search_precision=search_precision)
    return profile


def parse_branches(text: str | None, profile: Profile) -> tuple[str, ...]:
    """Parse `--branches` (comma list); default = the profile's default branches."""
    if not text:
        return profile.default_branches
    chosen = tuple(dict.fromkeys(b.strip() for b in text.split(",") if b.strip()))
    for b in chosen:
        if b not in BRANCHES:
            raise ValueError(f"unknown branch {b!r}: choose from {', '.join(BRANCHES)}")
        if b == "personalized":
            profile.require_diffusion("--branches personalized")
        if b not in profile.branches:
            raise ValueError(
                f"branch {b!r} is not available with profile {profile.name!r} "
                f"(it has {', '.join(profile.branches)})"
            )
    if not chosen:
        raise ValueError("--branches is empty")
    return chosen
