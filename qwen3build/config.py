"""Build settings: defaults from qwen3build.toml < environment < doit command-line vars.

Settings are a frozen dataclass validated once; every error is one line that names the
setting, the bad value and what is allowed. Nothing here touches weights or outputs.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from pathlib import Path

from .errors import BuildError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULTS_FILE = REPO_ROOT / "qwen3build.toml"

# Upper bound on SEQ_LEN: the shards carry SEQ_LEN x SEQ_LEN mask tables.
MAX_SEQ_LEN = 32768
# ANE compile stability ceiling seen in the field (DESIGN section 4): warn above it.
ANE_MAX_LAYERS_PER_SHARD = 15
# Packages above ~1.0-1.4 GB have been seen to fall back off the ANE on iOS, silently.
ANE_MAX_PACKAGE_BYTES = 1_000_000_000

PATH_KEYS = ("CONFIG", "WEIGHTS", "WEIGHTS_INDEX", "WEIGHTS_GLOB", "LUT_DIR", "OMNIQ_DIR",
             "SCALES", "OUT_DIR", "MIL_DIR", "TMP_DIR", "CACHE_DIR", "RECIPE_FILE")
SETTING_KEYS = PATH_KEYS + ("SEQ_LEN", "SHARDS", "PALETTIZE_MASKS", "RECIPE")


@dataclasses.dataclass(frozen=True)
class Settings:
    CONFIG: Path
    WEIGHTS: Path | None
    WEIGHTS_INDEX: Path | None
    WEIGHTS_GLOB: str
    LUT_DIR: Path | None
    OMNIQ_DIR: Path | None
    SCALES: Path | None
    OUT_DIR: Path
    MIL_DIR: Path
    TMP_DIR: Path
    CACHE_DIR: Path
    SEQ_LEN: int
    SHARDS: str
    PALETTIZE_MASKS: bool
    RECIPE: str
    RECIPE_FILE: Path

    @property
    def artifacts_dir(self) -> Path:
        """artifacts/ (the parent of coreml/packages by default)."""
        return self.OUT_DIR.parent.parent if self.OUT_DIR.parent.name == "coreml" else self.OUT_DIR.parent

    @property
    def numerics_dir(self) -> Path:
        return self.artifacts_dir / "numerics"


def _parse_bool(key: str, raw) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise BuildError(f"{key}={raw!r} is not a boolean: use 1/0, true/false, yes/no or on/off")


def parse_seq_len(raw) -> int:
    text = str(raw).strip()
    if not re.fullmatch(r"[0-9]+", text):
        raise BuildError(f"SEQ_LEN={raw!r} is not a whole number: give the context capacity in tokens, e.g. SEQ_LEN=4096")
    value = int(text)
    if not 2 <= value <= MAX_SEQ_LEN:
        raise BuildError(f"SEQ_LEN={value} is out of range: it must be between 2 and {MAX_SEQ_LEN}")
    return value


def load_settings(overrides: dict | None = None, environ: dict | None = None,
                  defaults_file: Path = DEFAULTS_FILE) -> Settings:
    """Merge defaults < environment < overrides (doit vars), resolve paths, validate."""
    environ = os.environ if environ is None else environ
    with open(defaults_file, "rb") as handle:
        # Tables ([verify.fp16], ...) belong to other readers; settings are the flat keys.
        full = tomllib.load(handle)
    raw = {k: v for k, v in full.items() if not isinstance(v, dict)}
    recipes = tuple(full.get("recipes", {}))
    unknown = sorted(set(raw) - set(SETTING_KEYS))
    if unknown:
        raise BuildError(f"{defaults_file.name}: unknown setting(s) {', '.join(unknown)}; allowed: {', '.join(SETTING_KEYS)}")
    for key in SETTING_KEYS:
        if key in environ:
            raw[key] = environ[key]
    for key, value in (overrides or {}).items():
        if key not in SETTING_KEYS:
            raise BuildError(f"unknown setting {key}; allowed: {', '.join(SETTING_KEYS)}")
        raw[key] = value
    base = defaults_file.parent

    def path_or_none(key):
        text = str(raw.get(key, "") or "").strip()
        return (base / text).resolve() if text else None

    recipe_file = path_or_none("RECIPE_FILE") or defaults_file
    if recipe_file != defaults_file:
        try:
            with open(recipe_file, "rb") as handle:
                recipes = tuple(tomllib.load(handle).get("recipes", {}))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise BuildError(f"RECIPE_FILE={recipe_file}: cannot read ({exc}); give a TOML file with [recipes.<name>] tables") from None
    recipe = str(raw.get("RECIPE", "fp16")).strip()
    if recipe not in recipes:
        raise BuildError(f"RECIPE={recipe!r} is unknown; recipes in {recipe_file.name}: {', '.join(recipes) or 'none'}")
    settings = Settings(
        CONFIG=path_or_none("CONFIG") or (base / "assets/qwen3-tiny/config.json"),
        WEIGHTS=path_or_none("WEIGHTS"),
        WEIGHTS_INDEX=path_or_none("WEIGHTS_INDEX"),
        WEIGHTS_GLOB=str(raw.get("WEIGHTS_GLOB", "") or "").strip(),
        LUT_DIR=path_or_none("LUT_DIR"),
        OMNIQ_DIR=path_or_none("OMNIQ_DIR"),
        SCALES=path_or_none("SCALES"),
        OUT_DIR=path_or_none("OUT_DIR") or base / "artifacts/coreml/packages",
        MIL_DIR=path_or_none("MIL_DIR") or base / "artifacts/coreml/mil",
        TMP_DIR=path_or_none("TMP_DIR") or base / "artifacts/.tmp",
        CACHE_DIR=path_or_none("CACHE_DIR") or base / "cache",
        SEQ_LEN=parse_seq_len(raw.get("SEQ_LEN", 4096)),
        SHARDS=str(raw.get("SHARDS", "preset") or "preset").strip(),
        PALETTIZE_MASKS=_parse_bool("PALETTIZE_MASKS", raw.get("PALETTIZE_MASKS", False)),
        RECIPE=recipe,
        RECIPE_FILE=recipe_file,
    )
    if not settings.CONFIG.is_file():
        raise BuildError(f"CONFIG={settings.CONFIG} does not exist: point CONFIG at a Hugging Face config.json")
    return settings


# ---------------------------------------------------------------- decoder layout

@dataclasses.dataclass(frozen=True)
class ShardSpec:
    name: str
    first: int  # inclusive
    last: int   # inclusive
    is_entry: bool
    is_exit: bool

    @property
    def layers(self) -> range:
        return range(self.first, self.last + 1)

    @property
    def role(self) -> str:
        if self.is_entry and self.is_exit:
            return "entry+exit"
        return "entry" if self.is_entry else "exit" if self.is_exit else "interior"

    @property
    def package_name(self) -> str:
        return f"decoder_shard_{self.name}"


def preset_layout(num_layers: int) -> str:
    """left/mid/right at the 28-layer split points 11 and 20, scaled to the depth."""
    if num_layers < 3:
        names = ["left", "right"][:num_layers] if num_layers == 2 else ["left"]
        return ",".join(f"{n}:{i}-{i}" for i, n in enumerate(names))
    cut1 = max(1, round(num_layers * 11 / 28))
    cut2 = min(num_layers - 1, max(cut1 + 1, round(num_layers * 20 / 28)))
    return f"left:0-{cut1 - 1},mid:{cut1}-{cut2 - 1},right:{cut2}-{num_layers - 1}"


_SHARD_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):([0-9]+)-([0-9]+)$")


def parse_layout(text: str, num_layers: int) -> tuple[ShardSpec, ...]:
    """Parse and validate SHARDS against the model depth; one-line BuildError on any problem."""
    spec_text = preset_layout(num_layers) if text in ("", "preset") else text
    where = f"SHARDS={spec_text!r}"
    items = [item.strip() for item in spec_text.split(",")]
    if not spec_text.strip() or any(not item for item in items):
        raise BuildError(f"{where}: empty shard entry; write name:first-last,... e.g. left:0-10,mid:11-19,right:20-27")
    parsed = []
    for item in items:
        match = _SHARD_RE.match(item)
        if not match:
            raise BuildError(f"{where}: {item!r} is not name:first-last (one contiguous inclusive range per shard)")
        name, first, last = match.group(1), int(match.group(2)), int(match.group(3))
        if first > last:
            raise BuildError(f"{where}: shard {name!r} is empty ({first} > {last}); ranges are inclusive, first <= last")
        if last >= num_layers:
            raise BuildError(f"{where}: shard {name!r} reaches layer {last} but the model has layers 0-{num_layers - 1}")
        parsed.append((name, first, last))
    names = [p[0] for p in parsed]
    for name in names:
        if names.count(name) > 1:
            raise BuildError(f"{where}: shard {name!r} appears twice; a shard must be one contiguous range")
    parsed.sort(key=lambda p: p[1])
    expected = 0
    for name, first, last in parsed:
        if first > expected:
            raise BuildError(f"{where}: gap, layers {expected}-{first - 1} belong to no shard")
        if first < expected:
            raise BuildError(f"{where}: overlap, shard {name!r} starts at {first} but layer {first} is already covered")
        expected = last + 1
    if expected != num_layers:
        raise BuildError(f"{where}: gap, layers {expected}-{num_layers - 1} belong to no shard")
    count = len(parsed)
    return tuple(ShardSpec(name, first, last, is_entry=i == 0, is_exit=i == count - 1)
                 for i, (name, first, last) in enumerate(parsed))
