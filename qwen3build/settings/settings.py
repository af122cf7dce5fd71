"""Build settings: defaults from qwen3build.toml < environment < doit command-line vars.

Settings are a frozen dataclass validated once; every error is one line that names the
setting, the bad value and what is allowed. Nothing here touches weights or outputs.
Every default is in qwen3build.toml (settings/defaults.py reads it); none is in code.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
from pathlib import Path

from ..errors import BuildError
from ..paths import DEFAULTS_FILE, BuildTree
from ..stack import COREAI_COMPUTE_UNITS
from .defaults import read_defaults, read_toml
from .limits import MAX_SEQ_LEN

log = logging.getLogger(__name__)
PATH_KEYS = ("CONFIG", "WEIGHTS", "WEIGHTS_INDEX", "WEIGHTS_GLOB", "LUT_DIR", "OMNIQ_DIR",
             "SCALES", "OUT_DIR", "MIL_DIR", "TMP_DIR", "CACHE_DIR", "RECIPE_FILE")
SETTING_KEYS = PATH_KEYS + ("SEQ_LEN", "SHARDS", "PALETTIZE_MASKS", "KV_WRITE", "PREFILL_LEN", "RECIPE", "FORMATS",
                             "COREAI_COMPUTE_UNIT", "CACHE_MAX_SIZE")
# FORMATS: which package formats the build makes (docs/coreai.md), in this order.
FORMAT_NAMES = ("coreml", "coreai")
# KV_WRITE: how a shard writes this token's K/V rows into its state (docs/build.md).
KV_WRITE_MODES = ("blend", "slice")
# PREFILL_LEN: tokens per `prefill` call (docs/prefill.md). 0 builds decode only. The cap:
# the field ships 8 (CoreML-LLM), 64 (ANEMLL, Apple's chunked prefill) and query lengths
# up to 64 (Core AI exports); a call's transients grow with it (the (T, S) mask and the
# (KVH, S, G*T) scores: 64 MB per layer at T=512, S=4096, 16 heads), and past a few
# hundred tokens a block no longer saves dispatches worth having.
MAX_PREFILL_LEN = 512
# Settings that must name something (the rest may be "" = not given).
REQUIRED_PATHS = ("CONFIG", "OUT_DIR", "MIL_DIR", "TMP_DIR", "CACHE_DIR")


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
    KV_WRITE: str
    PREFILL_LEN: int
    RECIPE: str
    RECIPE_FILE: Path
    CACHE_MAX_SIZE: int | None  # bytes; None: no limit. Keys nothing (applied after a build).
    FORMATS: tuple[str, ...]    # a subset of FORMAT_NAMES, in that order
    COREAI_COMPUTE_UNIT: str    # run time only (macOS 27's Core AI runtime); keys nothing
    # Settings the environment or a doit variable gave (the rest are qwen3build.toml's
    # defaults): a default may be fitted to the model (SEQ_LEN), a given value never is.
    given: frozenset = dataclasses.field(default=frozenset(), compare=False)

    @property
    def tree(self) -> BuildTree:
        return BuildTree(self.OUT_DIR, self.MIL_DIR, self.TMP_DIR, self.CACHE_DIR)

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()
                if k != "given"}


def closest_name(name: str, allowed) -> str:
    """' (did you mean X?)' when a known name is close to `name`, else ''."""
    spelled = {str(option).lower(): str(option) for option in allowed}  # case-insensitive match
    match = difflib.get_close_matches(str(name).lower(), list(spelled), n=1, cutoff=0.6)
    return f" (did you mean {spelled[match[0]]}?)" if match else ""


def unknown_setting(name: str, allowed=SETTING_KEYS) -> BuildError:
    return BuildError(f"unknown setting {name}{closest_name(name, allowed)}; use one of: {', '.join(allowed)}")


def split_assignments(args, variables) -> tuple[dict, dict]:
    """KEY=VALUE command-line arguments -> (settings, the tool's own `variables`); a
    BuildError for an argument that is not KEY=VALUE or names neither."""
    settings, others = {}, {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            raise BuildError(f"{arg!r} is not KEY=VALUE")
        if key in SETTING_KEYS:
            settings[key] = value
        elif key in variables:
            others[key] = value
        else:
            raise BuildError(f"unknown variable {key}; allowed: {', '.join(SETTING_KEYS + tuple(variables))}")
    return settings, others


def merge_variables(kind: str, known, variables: dict | None, environ) -> dict:
    """A tool's own variables (verify, audit, release): the environment's < `variables`
    (doit command-line variables); empty values are unset; an unknown name is refused."""
    raw = {key: environ[key] for key in known if environ.get(key) not in (None, "")}
    for key, value in (variables or {}).items():
        if key not in known:
            raise BuildError(f"unknown {kind} variable {key}; allowed: {', '.join(known)}")
        if value not in (None, ""):
            raw[key] = value
    return raw


def parse_bool(key: str, raw) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise BuildError(f"{key}={raw!r} is not a boolean: use 1/0, true/false, yes/no or on/off")


def parse_choice(key: str, raw, allowed) -> str:
    if not isinstance(raw, str) or raw.strip() not in allowed:
        raise BuildError(f"{key}={raw!r} is not one of {', '.join(allowed)}; choose one of them")
    return raw.strip()


def parse_whole(key: str, raw, low: int, high: int, example: str) -> int:
    """A whole number in [low, high]; a bool, a float or "2.0" is refused."""
    if isinstance(raw, bool) or isinstance(raw, float):
        raise BuildError(f"{key}={raw!r} is not a whole number: {example}")
    text = str(raw).strip()
    if not re.fullmatch(r"[0-9]+", text):
        raise BuildError(f"{key}={raw!r} is not a whole number: {example}")
    value = int(text)
    if not low <= value <= high:
        raise BuildError(f"{key}={value} is out of range: choose a value between {low} and {high}")
    return value

_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text, what: str = "size") -> int:
    """'20G', '500MB', '1.5GiB', '1048576' -> bytes (binary units)."""
    match = _SIZE_RE.match(text) if isinstance(text, str) else None
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    if not match:
        raise BuildError(f"{what}={text!r} is not a size: give bytes or a number with K, M, G or T (e.g. 20G)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def parse_cache_max_size(raw) -> int | None:
    """CACHE_MAX_SIZE: "" (no limit) or a size; the cache is trimmed to it after each build."""
    if isinstance(raw, str) and not raw.strip():
        return None
    return parse_size(raw, "CACHE_MAX_SIZE")



def parse_seq_len(raw) -> int:
    return parse_whole("SEQ_LEN", raw, 2, MAX_SEQ_LEN, "give the context capacity in tokens, e.g. SEQ_LEN=4096")


def parse_prefill_len(raw, seq_len: int, given: bool) -> int:
    """Tokens per `prefill` call (0: decode only). A block must fit in the ring, so a given
    value above SEQ_LEN is refused; the default is fitted to a smaller SEQ_LEN (like
    SEQ_LEN's own default to the model)."""
    value = parse_whole("PREFILL_LEN", raw, 0, MAX_PREFILL_LEN,
                        "give the tokens per prefill call, e.g. PREFILL_LEN=64 (0 builds decode only)")
    if value <= seq_len:
        return value
    if given:
        raise BuildError(f"PREFILL_LEN={value} exceeds SEQ_LEN={seq_len}: a prefill block must fit in the KV ring; "
                         f"choose PREFILL_LEN <= {seq_len} (or 0)")
    log.debug("PREFILL_LEN: the default %d exceeds SEQ_LEN=%d; using PREFILL_LEN=%d", value, seq_len, seq_len)
    return seq_len


def parse_formats(raw) -> tuple[str, ...]:
    """FORMATS: "coreml", "coreai" or both, comma-separated in any order; as FORMAT_NAMES
    orders them."""
    example = "e.g. FORMATS=coreml or FORMATS=coreml,coreai"
    if not isinstance(raw, str):
        raise BuildError(f"FORMATS={raw!r} must be text; write {example}")
    names = [part.strip() for part in raw.split(",")]
    if not any(names):
        raise BuildError(f"FORMATS is empty; give at least one of {', '.join(FORMAT_NAMES)}, {example}")
    for name in names:
        if name not in FORMAT_NAMES:
            what = "an empty entry" if not name else f"{name!r} is unknown{closest_name(name, FORMAT_NAMES)}"
            raise BuildError(f"FORMATS={raw!r}: {what}; use {' and/or '.join(FORMAT_NAMES)}, {example}")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise BuildError(f"FORMATS={raw!r} names {', '.join(twice)} twice; give each format once, {example}")
    return tuple(name for name in FORMAT_NAMES if name in names)


def load_settings(overrides: dict | None = None, environ: dict | None = None,
                  defaults_file: Path = DEFAULTS_FILE) -> Settings:
    """Merge defaults < environment < overrides (doit vars), resolve paths, validate."""
    environ = os.environ if environ is None else environ
    defaults = read_defaults(defaults_file)
    raw = dict(defaults.settings)
    unknown = sorted(set(raw) - set(SETTING_KEYS))
    if unknown:
        raise BuildError(f"{defaults_file.name}: unknown setting(s) {', '.join(unknown)}; allowed: {', '.join(SETTING_KEYS)}")
    missing = [key for key in SETTING_KEYS if key not in raw]
    if missing:
        raise BuildError(f"{defaults_file.name} does not give {', '.join(missing)}; every setting needs a default there")
    given = set()
    for key in SETTING_KEYS:
        if key in environ:
            raw[key] = environ[key]
            given.add(key)
    for key, value in (overrides or {}).items():
        if key not in SETTING_KEYS:
            raise unknown_setting(key)
        raw[key] = value
        given.add(key)
    base = defaults_file.parent

    def path_or_none(key):
        value = raw[key]
        if not isinstance(value, str):
            raise BuildError(f"{key}={value!r} must be a path (a string); quote it in qwen3build.toml")
        text = value.strip()
        # abspath, not resolve(): OUT_DIR and MIL_DIR are links into the published
        # generation, and must stay the links.
        return Path(os.path.abspath(base / Path(text).expanduser())) if text else None

    def required_path(key):
        path = path_or_none(key)
        if path is None:
            raise BuildError(f"{key} is empty; give a path")
        return path

    recipe_file = path_or_none("RECIPE_FILE") or defaults_file
    recipes = (defaults.recipes if recipe_file == defaults_file
               else read_toml(recipe_file, "RECIPE_FILE").get("recipes", {}))
    if not isinstance(recipes, dict):
        raise BuildError(f"RECIPE_FILE={recipe_file}: [recipes] must hold [recipes.<name>] tables, not "
                         f"{type(recipes).__name__}; write each recipe as a [recipes.<name>] table")
    recipe = raw["RECIPE"]
    if not isinstance(recipe, str) or recipe.strip() not in recipes:
        raise BuildError(f"RECIPE={recipe!r} is unknown{closest_name(str(recipe), recipes)}; recipes in "
                         f"{recipe_file.name}: {', '.join(recipes) or 'none'}: choose one, or define "
                         f"[recipes.<name>] in RECIPE_FILE")
    shards = raw["SHARDS"]
    if not isinstance(shards, str):
        raise BuildError(f"SHARDS={shards!r} must be text; write e.g. \"left:0-10,mid:11-19,right:20-27\" or "
                         "\"preset\"")
    glob = raw["WEIGHTS_GLOB"]
    if not isinstance(glob, str):
        raise BuildError(f"WEIGHTS_GLOB={glob!r} must be a glob pattern (a string); quote it in qwen3build.toml")
    seq_len = parse_seq_len(raw["SEQ_LEN"])
    settings = Settings(
        CONFIG=required_path("CONFIG"),
        WEIGHTS=path_or_none("WEIGHTS"),
        WEIGHTS_INDEX=path_or_none("WEIGHTS_INDEX"),
        WEIGHTS_GLOB=glob.strip(),
        LUT_DIR=path_or_none("LUT_DIR"),
        OMNIQ_DIR=path_or_none("OMNIQ_DIR"),
        SCALES=path_or_none("SCALES"),
        OUT_DIR=required_path("OUT_DIR"),
        MIL_DIR=required_path("MIL_DIR"),
        TMP_DIR=required_path("TMP_DIR"),
        CACHE_DIR=required_path("CACHE_DIR"),
        SEQ_LEN=seq_len,
        SHARDS=shards.strip() or "preset",
        PALETTIZE_MASKS=parse_bool("PALETTIZE_MASKS", raw["PALETTIZE_MASKS"]),
        KV_WRITE=parse_choice("KV_WRITE", raw["KV_WRITE"], KV_WRITE_MODES),
        PREFILL_LEN=parse_prefill_len(raw["PREFILL_LEN"], seq_len, "PREFILL_LEN" in given),
        RECIPE=recipe.strip(),
        RECIPE_FILE=recipe_file,
        CACHE_MAX_SIZE=parse_cache_max_size(raw["CACHE_MAX_SIZE"]),
        FORMATS=parse_formats(raw["FORMATS"]),
        COREAI_COMPUTE_UNIT=parse_choice("COREAI_COMPUTE_UNIT", raw["COREAI_COMPUTE_UNIT"], COREAI_COMPUTE_UNITS),
        given=frozenset(given),
    )
    if settings.CONFIG.is_dir():
        inside = settings.CONFIG / "config.json"
        hint = str(inside) if inside.is_file() else "the checkpoint's config.json"
        raise BuildError(f"CONFIG={settings.CONFIG} is a directory; point CONFIG at {hint}")
    if not settings.CONFIG.is_file():
        raise BuildError(f"CONFIG={settings.CONFIG} does not exist: point CONFIG at a Hugging Face config.json")
    return settings
