"""The one reader of qwen3build.toml: flat settings, [recipes.*] and [verify.*] tables.

Every default lives in that file and nowhere in code: a key the file does not give is an
error naming the file, never a silent fallback.
"""
from __future__ import annotations

import dataclasses
import functools
import tomllib
from pathlib import Path

from ..errors import BuildError
from ..paths import DEFAULTS_FILE


@dataclasses.dataclass(frozen=True)
class DefaultsFile:
    path: Path
    settings: dict   # flat keys: CONFIG, SEQ_LEN, ...
    recipes: dict    # name -> raw [recipes.<name>] table
    verify: dict     # recipe name -> raw [verify.<recipe>] table


def read_toml(path: Path, what: str) -> dict:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise BuildError(f"{what}={path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise BuildError(f"{what}={path}: cannot read as TOML ({exc})") from None


@functools.lru_cache(maxsize=None)
def read_defaults(path: Path = DEFAULTS_FILE) -> DefaultsFile:
    full = read_toml(path, "defaults file")
    flat = {k: v for k, v in full.items() if not isinstance(v, dict)}
    recipes = full.get("recipes", {})
    verify = full.get("verify", {})
    if not isinstance(recipes, dict) or not isinstance(verify, dict):
        raise BuildError(f"{path.name}: [recipes.*] and [verify.*] must be tables")
    return DefaultsFile(path, flat, recipes, verify)
