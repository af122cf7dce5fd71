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
    remedy = "point it at a TOML file of [recipes.<name>] tables (docs/quantization.md)"
    if Path(path).is_dir():
        raise BuildError(f"{what}={path} is a directory; {remedy}")
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise BuildError(f"{what}={path} does not exist; {remedy}") from None
    except OSError as exc:
        raise BuildError(f"{what}={path}: cannot read ({exc.strerror}); {remedy}") from None
    except UnicodeDecodeError:
        raise BuildError(f"{what}={path}: not a text file, so not TOML; {remedy}") from None
    except tomllib.TOMLDecodeError as exc:
        raise BuildError(f"{what}={path}: not valid TOML ({exc}); fix the syntax") from None


@functools.lru_cache(maxsize=None)
def read_defaults(path: Path = DEFAULTS_FILE) -> DefaultsFile:
    full = read_toml(path, "defaults file")
    flat = {k: v for k, v in full.items() if not isinstance(v, dict)}
    recipes = full.get("recipes", {})
    verify = full.get("verify", {})
    if not isinstance(recipes, dict) or not isinstance(verify, dict):
        raise BuildError(f"{path.name}: [recipes.*] and [verify.*] must be tables")
    return DefaultsFile(path, flat, recipes, verify)
