"""The bundle manifest as types: the one schema the exporter writes through and the runtime reads through.

Why one module: the manifest is the contract between the workstation that exports a bundle and
the device that serves it; keys spelt by hand in each reader surface as a KeyError deep inside
serving, or as a silent default. Here every key is declared once with its type: ``from_dict``
refuses a manifest with a :class:`BundleError` naming the key, and ``to_dict`` gives back exactly
the dict it was built from, so the JSON on disk (and its digest) is as before there were types.

Sections their own consumer validates (scoring, scheduler; fusion, diffusion, tuning: reported
only) stay plain dicts; unnamed keys are kept in ``other``, so a round trip loses nothing. Stdlib only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
ENGINES_DIR = "engines"  # built on the target; excluded from the file list
DIGEST_KEY = "manifest_sha256"
_META = ("other", "present")  # bookkeeping fields of every section, not manifest keys
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list", dict: "an object", type(None): "null"}


class BundleError(ValueError):
    """A bundle is missing, malformed or does not match its manifest; the message lists why."""


def check_file_name(name: str) -> str | None:
    """Why ``name`` is not a valid bundle file name, or None. Names are relative POSIX paths inside
    the bundle: a manifest must never make the runtime read (or the writer overwrite) a file elsewhere."""
    if not isinstance(name, str) or not name:
        return f"invalid file name {name!r}"
    p = PurePosixPath(name)
    if p.is_absolute() or "\\" in name or any(part in ("", ".", "..") for part in name.split("/")):
        return f"invalid file name {name!r} (must be a relative path inside the bundle)"
    if name == MANIFEST_NAME:
        return f"{MANIFEST_NAME!r} cannot be listed as a bundle file"
    if p.parts[0] == ENGINES_DIR:
        return f"{name!r}: files under {ENGINES_DIR}/ are built on the target, not listed"
    return None


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own ``manifest_sha256`` key."""
    body = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# ------------------------------------------------------------------------------ declarations
def _key(types: tuple[type, ...] = (), *, required: bool = False, section: type | None = None,
         mapping: bool = False, items: tuple[type, ...] | None = None) -> Any:
    """Declare a manifest key: JSON ``types`` (or a ``section`` class, optionally a ``mapping``
    name -> section), list ``items`` types, and whether it must be present."""
    return field(default=None, metadata={"types": types, "required": required, "section": section,
                                         "mapping": mapping, "items": items})


def _kind(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _is(value: Any, types: tuple[type, ...]) -> bool:
    """JSON typing: true/false is not an integer, an integer is a number."""
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, tuple(t for t in types if t is not bool))


def _expected(types: tuple[type, ...]) -> str:
    return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)


S = TypeVar("S", bound="Section")
T = TypeVar("T")


def need(value: T | None, key: str) -> T:
    """``value``, else a :class:`BundleError` naming ``key``: most keys are optional (they depend
    on the branches), and a reader that needs one must fail naming it, not on None."""
    if value is None:
        raise BundleError(f"{MANIFEST_NAME} has no {key!r}: re-export the bundle with this o2n-edge version")
    return value


@dataclass(kw_only=True)
class Section:
    """Base of every manifest section, parsed and emitted by its fields' declarations. ``other``: keys
    the schema does not name; ``present``: declared keys in the source (an explicit null survives)."""

    other: dict[str, Any] = field(default_factory=dict, repr=False)
    present: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    @classmethod
    def parse(cls: type[S], data: Any, where: str, problems: list[str]) -> S | None:
        """Build from ``data``, appending one line per problem; a bad value is left out (None)."""
        if not isinstance(data, Mapping):
            problems.append(f"{where}: expected an object, got {_kind(data)}")
            return None
        kwargs: dict[str, Any] = {}
        declared = set()
        for f in fields(cls):
            if f.name in _META:
                continue
            declared.add(f.name)
            path = f"{where}.{f.name}" if where else f.name
            if f.name not in data:
                if f.metadata["required"]:
                    problems.append(f"missing key {path!r}")
                continue
            kwargs[f.name] = _parse_value(f.metadata, data[f.name], path, problems)
        other = {k: v for k, v in data.items() if k not in declared}
        return cls(**kwargs, other=other, present=frozenset(k for k in declared if k in data))

    @classmethod
    def from_mapping(cls: type[S], data: Any, where: str = "") -> S:
        """Parse a producer's plain dict (the encoder's facts, a graph's entry); :class:`BundleError`
        listing every problem, so the exporter fails on the workstation, naming the key."""
        problems: list[str] = []
        parsed = cls.parse(data, where, problems)
        if parsed is None or problems:
            raise BundleError(f"invalid manifest section {where or cls.__name__}:\n  " + "\n  ".join(problems))
        return parsed

    def to_dict(self) -> dict[str, Any]:
        """The plain JSON dict: exactly the keys and values it was parsed from (fresh containers)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in _META:
                continue
            value = getattr(self, f.name)
            if value is None and f.name not in self.present:
                continue
            out[f.name] = _emit(value)
        out.update(_emit(self.other))
        return out


def _parse_value(meta: Mapping[str, Any], value: Any, path: str, problems: list[str]) -> Any:
    section = meta["section"]
    if section is not None and meta["mapping"]:
        if not isinstance(value, Mapping):
            problems.append(f"{path}: expected an object, got {_kind(value)}")
            return None
        parsed = {str(k): section.parse(v, f"{path}.{k}", problems) for k, v in value.items()}
        return {k: v for k, v in parsed.items() if v is not None}
    if section is not None:
        return section.parse(value, path, problems)
    if not _is(value, meta["types"]):
        problems.append(f"{path}: expected {_expected(meta['types'])}, got {_kind(value)}")
        return None
    items = meta["items"]
    if items is not None and isinstance(value, list):
        for i, item in enumerate(value):
            if not _is(item, items):
                problems.append(f"{path}[{i}]: expected {_expected(items)}, got {_kind(item)}")
                return None
    return value


def _emit(value: Any) -> Any:
    if isinstance(value, Section):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {k: _emit(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_emit(v) for v in value]
    return value


# ------------------------------------------------------------------------------ sections
_NUM = (float,)  # accepts integers too (JSON writes 1.0 as 1 in some producers)


@dataclass(kw_only=True)
class FileEntry(Section):
    """``files[name]``: what the verifier compares the file on disk with."""

    sha256: str = _key((str,), required=True)
    bytes: int = _key((int,), required=True)


@dataclass(kw_only=True)
class TensorSpec(Section):
    """One graph input or output: ``shape`` holds ints and symbolic axis names."""

    shape: list[int | str] | None = _key((list,), items=(int, str))
    dtype: str | None = _key((str,))


@dataclass(kw_only=True)
class ModelEntry(Section):
    """``models[name]``: one exported graph (``ExportReport.manifest_entry()``)."""

    file: str | None = _key((str,))
    inputs: dict[str, TensorSpec] | None = _key(section=TensorSpec, mapping=True)
    outputs: dict[str, TensorSpec] | None = _key(section=TensorSpec, mapping=True)
    precision: str | None = _key((str,))
    opset: int | None = _key((int,))
    validation: dict[str, Any] | None = _key((dict,))
    tolerance: float | None = _key(_NUM)
    trt_profiles: list[dict[str, Any]] | None = _key((list,), items=(dict,))
    ort_disabled_optimizers: list[str] | None = _key((list,), items=(str,))
    extra: dict[str, Any] | None = _key((dict,))


@dataclass(kw_only=True)
class Shots(Section):
    """Which good images the bundle was made from, and the seed that drew them."""

    images: list[str] | None = _key((list,), items=(str,))
    seed: int | None = _key((int,))
    k: int | None = _key((int,))


@dataclass(kw_only=True)
class Decode(Section):
    """How the runtime decodes images (``jpeg_draft``: JPEG draft-mode downscaling)."""

    jpeg_draft: bool | None = _key((bool,))


@dataclass(kw_only=True)
class EncoderInfo(Section):
    """The scoring encoder's static facts (``FeatureEncoder.describe()``)."""

    encoder: str | None = _key((str,))
    image_size: int | None = _key((int,))
    mean: list[float] | None = _key((list,), items=_NUM)
    std: list[float] | None = _key((list,), items=_NUM)
    has_text: bool | None = _key((bool,))
    patch_dim: int | None = _key((int,))
    global_dim: int | None = _key((int,))
    grid: list[int] | None = _key((list,), items=(int,))
    output_names: list[str] | None = _key((list,), items=(str,))
    tiling: dict[str, Any] | None = _key((dict, type(None)))
    # [lo, hi] grey levels images are kept in before encoding (data.photometric); null/absent = off
    brightness_range: list[float] | None = _key((list, type(None)), items=_NUM)


@dataclass(kw_only=True)
class MemoryBankInfo(Section):
    """Size and provenance of ``memory_bank.npy`` (coreset and generated-pool counts)."""

    rows: int | None = _key((int,))
    dim: int | None = _key((int,))
    coreset: dict[str, Any] | None = _key((dict,))
    pool_size: int | None = _key((int,))


@dataclass(kw_only=True)
class Threshold(Section):
    """The decision threshold and how it was calibrated."""

    value: float = _key(_NUM, required=True)
    method: str | None = _key((str,))
    quantile: float | None = _key(_NUM)
    n_images: int | None = _key((int,))
    images: list[str] | None = _key((list,), items=(str,))
    scores: list[float] | None = _key((list,), items=_NUM)  # the calibration images' scores (auto-good)


@dataclass(kw_only=True)
class Transform(Section):
    """The one-to-normal img2img run: strength, steps requested and run, exact timesteps."""

    strength: float | None = _key(_NUM)
    steps: int | None = _key((int,))
    steps_run: int | None = _key((int,))
    timesteps: list[int] | None = _key((list,), items=(int,))
    strength_mode: str | None = _key((str,))
    seed: int | None = _key((int,))
    keep_low_sigma: float | None = _key(_NUM)


@dataclass(kw_only=True)
class Lineage(Section):
    """Where a learned bundle came from (``o2n-edge learn``): every bank change is traceable and undoable."""

    parent_hash: str = _key((str,), required=True)
    parent_path: str | None = _key((str,))
    created_at: str | None = _key((str,))
    added: list[dict[str, Any]] | None = _key((list,), items=(dict,))
    earlier: list[str] | None = _key((list,), items=(str,))  # sha256 added by the parent's ancestors
    calibration: list[dict[str, Any]] | None = _key((list,), items=(dict,))
    skipped: list[dict[str, Any]] | None = _key((list,), items=(dict,))
    threshold: dict[str, Any] | None = _key((dict,))  # parent's and new value, whether recalibrated
    constants: dict[str, Any] | None = _key((dict,))  # the rule that set the bank's constants, and its weights


@dataclass(kw_only=True)
class BundleManifest(Section):
    """``manifest.json``. Only the bookkeeping keys are required; the rest depend on the branches."""

    schema_version: int = _key((int,), required=True)
    files: dict[str, FileEntry] = _key(section=FileEntry, mapping=True, required=True)
    manifest_sha256: str = _key((str,), required=True)
    profile: str | None = _key((str,))
    category: str | None = _key((str,))
    dataset: str | None = _key((str,))
    precision: str | None = _key((str,))
    image_size: int | None = _key((int,))
    diffusion_image_size: int | None = _key((int,))
    decode: Decode | None = _key(section=Decode)
    shots: Shots | None = _key(section=Shots)
    encoder: EncoderInfo | None = _key(section=EncoderInfo)
    scoring: dict[str, Any] | None = _key((dict,))
    fusion: dict[str, Any] | None = _key((dict,))
    memory_bank: MemoryBankInfo | None = _key(section=MemoryBankInfo)
    threshold: Threshold | None = _key(section=Threshold)
    models: dict[str, ModelEntry] | None = _key(section=ModelEntry, mapping=True)
    tuning: dict[str, Any] | None = _key((dict,))
    prompt: str | None = _key((str,))
    strength: float | None = _key(_NUM)
    steps: int | None = _key((int,))
    steps_run: int | None = _key((int,))
    scheduler: dict[str, Any] | None = _key((dict,))
    transform: Transform | None = _key(section=Transform)
    diffusion: dict[str, Any] | None = _key((dict,))
    versions: dict[str, str | None] | None = _key((dict,))
    lineage: Lineage | None = _key(section=Lineage)

    @classmethod
    def check(cls, data: Any) -> tuple[BundleManifest, list[str]]:
        """Parse leniently: the manifest (bad values left out) and every problem, each naming its key.
        Beyond types: the schema version, file names inside the bundle, model entries naming listed
        files. The digest is not checked here (see :meth:`digest_ok`)."""
        problems: list[str] = []
        parsed = cls.parse(data, "", problems) if isinstance(data, Mapping) else None
        if parsed is None:
            return cls(schema_version=0, files={}, manifest_sha256=""), [
                f"{MANIFEST_NAME}: top level is not an object"]
        if parsed.schema_version is not None and parsed.schema_version != SCHEMA_VERSION:
            problems.append(f"schema_version {parsed.schema_version!r} is not {SCHEMA_VERSION} "
                            "(re-export the bundle with this o2n-edge version)")
        for name in list(parsed.files or {}):
            bad = check_file_name(name)
            if bad:
                problems.append(bad)
                del parsed.files[name]
        for mname, entry in (parsed.models or {}).items():
            if entry.file is not None and entry.file not in (parsed.files or {}):
                problems.append(f"models.{mname}: file {entry.file!r} not listed in {MANIFEST_NAME}")
        if parsed.files is None:
            parsed.files = {}
        return parsed, [p if p.startswith(MANIFEST_NAME) else f"{MANIFEST_NAME}: {p}" for p in problems]

    @classmethod
    def from_dict(cls, data: Any) -> BundleManifest:
        """Parse and validate; raise :class:`BundleError` listing every problem."""
        manifest, problems = cls.check(data)
        if problems:
            raise BundleError("invalid bundle manifest:\n  " + "\n  ".join(problems))
        return manifest

    def digest_ok(self) -> bool:
        """Whether ``manifest_sha256`` matches the rest (a hand-edited threshold is refused)."""
        return self.manifest_sha256 == manifest_digest(self.to_dict())

    @property
    def branches(self) -> tuple[str, ...]:
        """The scoring branches (``scoring.branches``); empty when the manifest has no scoring."""
        return tuple((self.scoring or {}).get("branches", ()))

    def model(self, name: str) -> ModelEntry:
        """``models[name]``, or an empty entry for a graph the manifest does not describe."""
        return (self.models or {}).get(name) or ModelEntry()


def read_manifest_json(path: str | Path) -> dict[str, Any]:
    """The raw JSON object of ``<bundle>/manifest.json``; :class:`BundleError` when missing or malformed."""
    mpath = Path(path) / MANIFEST_NAME
    if not mpath.is_file():
        raise BundleError(f"{path}: missing {MANIFEST_NAME}")
    try:
        data = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: malformed {MANIFEST_NAME}: {exc}") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{path}: malformed {MANIFEST_NAME}: top level is not an object")
    return data


def load_manifest(path: str | Path) -> BundleManifest:
    """The validated manifest of the bundle at ``path`` (files are not hashed: see ``verify_bundle``)."""
    return BundleManifest.from_dict(read_manifest_json(path))


def manifest_json(manifest: BundleManifest) -> str:
    """The on-disk text of a manifest: sorted keys, indented, NaN/Inf refused."""
    return json.dumps(manifest.to_dict(), indent=2, sort_keys=True, allow_nan=False)
