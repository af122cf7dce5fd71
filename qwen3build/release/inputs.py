"""What a release reads, checked before anything is written: the published stack, the
verify report of exactly its packages, the audit report of exactly its packages, and the
checkpoint files it ships (config, tokenizer, generation config, licence files).

Every refusal is one line naming what is missing and the command that makes it.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from ..build.keys import digest_bytes
from ..errors import BuildError
from ..stack import Stack
from .options import ReleaseRequest

# Checkpoint files a release ships beside the packages when the checkpoint has them.
CONFIG_NAME = "config.json"
TOKENIZER_NAME = "tokenizer.json"
OPTIONAL_FILES = ("tokenizer_config.json", "generation_config.json")
LICENSE_PREFIXES = ("LICENSE", "LICENCE", "NOTICE")
# Licence texts recognised well enough to name their Hugging Face licence id.
LICENSE_SIGNATURES = (
    ("apache-2.0", ("Apache License", "Version 2.0")),
    ("mit", ("Permission is hereby granted, free of charge",)),
    ("bsd-3-clause", ("Redistribution and use in source and binary forms", "Neither the name")),
)
UNKNOWN_LICENSE = "unknown"      # a Hugging Face licence id: nothing says what the licence is
OTHER_LICENSE = "other"          # a licence file the release does not recognise
FOLDER_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]+")
UNVERIFIED_HINT = "run `doit verify` on this build first (or RELEASE_UNVERIFIED=1 to release without parity figures)"


@dataclasses.dataclass(frozen=True)
class License:
    id: str                      # Hugging Face licence id (apache-2.0, mit, other, unknown)
    files: tuple[str, ...]       # LICENSE* / NOTICE* file names copied from the checkpoint
    source: str                  # where the id comes from, for the card


@dataclasses.dataclass
class ReleaseInputs:
    plan: object
    request: ReleaseRequest
    stack: Stack
    package_keys: dict           # artifact id (io_model, shard:left, ...) -> content key
    verify: dict | None          # the passing report of these packages; None when unverified
    verify_bytes: bytes | None
    unverified: tuple | None     # (kind, one line) when released with RELEASE_UNVERIFIED=1 unverified
    audit: dict
    audit_bytes: bytes
    checkpoint_files: dict       # name in the bundle -> source path
    checkpoint_config: dict      # the checkpoint's config.json, parsed
    license: License
    base_model: str | None
    model_name: str
    build_records: dict          # artifact id -> what the build recorded making it (cache meta "extra")

    @property
    def verified(self) -> bool:
        return self.verify is not None

    @property
    def folder_name(self) -> str:
        return folder_name(self.model_name, self.stack.recipe, self.stack.seq_len)


def folder_name(model_name: str, recipe: str, seq_len: int) -> str:
    """<model>-<recipe>-s<SEQ_LEN>, in characters any file system and URL keep."""
    text = FOLDER_CHARACTERS.sub("-", f"{model_name}-{recipe}-s{seq_len}").strip(".-_")
    return text or f"qwen3-s{seq_len}"


def package_keys(stack: Stack, package_ids: list[str]) -> dict:
    keys = stack.info.get("keys") or {}
    missing = [artifact for artifact in package_ids if not keys.get(artifact)]
    if missing:
        raise BuildError(f"{stack.models_dir}/stack.json records no key for {', '.join(missing)}: "
                         "it was not published by this qwen3build; run `doit build` again")
    return {artifact: keys[artifact] for artifact in package_ids}


def _read_json(path: Path) -> tuple[dict | None, bytes | None]:
    try:
        data = path.read_bytes()
        report = json.loads(data)
    except (OSError, ValueError):
        return None, None
    return (report, data) if isinstance(report, dict) else (None, None)


# Why a verify report does not vouch for the packages: kind -> what the card says.
UNVERIFIED_BECAUSE = {
    "missing": "there was no verify report of these packages",
    "other packages": "the verify report on hand measured other packages",
    "failed": "the verify report of these packages failed its gate",
    "no packages rung": "the verify report on hand did not measure the packages rung",
}


def verify_problem(report: dict | None, keys: dict, path: Path) -> tuple[str, str] | None:
    """(kind, one line) saying why `report` does not vouch for exactly these packages;
    None when it does. The kinds are UNVERIFIED_BECAUSE's."""
    if report is None:
        return "missing", f"no verify report at {path}"
    measured = (report.get("inputs") or {}).get("packages") or {}
    differ = [artifact for artifact, key in keys.items() if measured.get(artifact) != key]
    if differ:
        return "other packages", f"the verify report {path} measured other packages ({', '.join(differ)} differ)"
    if not report.get("passed"):
        return "failed", (f"the verify report {path} of these packages failed its gate "
                          f"({len(report.get('failures', []))} threshold(s) missed)")
    if "packages" not in (report.get("rungs") or {}):
        return "no packages rung", f"the verify report {path} has no packages rung (RUNGS=reference only)"
    return None


def read_verify(plan, request: ReleaseRequest, keys: dict) -> tuple[dict | None, bytes | None, tuple | None]:
    """(report, its bytes, None) for a passing report of these packages; with
    RELEASE_UNVERIFIED=1 and none, (None, None, (kind, why)); else a one-line refusal."""
    from ..verify.options import request_from_vars
    path = request_from_vars(plan, request.verify_vars, environ={}).report_path
    report, data = _read_json(path)
    problem = verify_problem(report, keys, path)
    if problem is None:
        return report, data, None
    if not request.unverified:
        raise BuildError(f"release refused: {problem[1]}; {UNVERIFIED_HINT}")
    return None, None, problem


def read_audit(plan, stack: Stack, request: ReleaseRequest) -> tuple[dict, bytes]:
    """The passing audit report of exactly these packages, or a one-line refusal."""
    from ..audit.options import request_from_vars
    from ..audit.run import audit_key
    audit_request = request_from_vars(plan.tree, request.audit_vars, environ={})
    path = audit_request.report_path
    report, data = _read_json(path)
    if report is None:
        raise BuildError(f"release refused: no audit report at {path}; run `doit audit` on this build first")
    if report.get("key") != audit_key(stack, audit_request):
        raise BuildError(f"release refused: the audit report {path} is not of these packages (or of other audit "
                         "code or variables); run `doit audit` on this build first")
    if not report.get("passed"):
        raise BuildError(f"release refused: the audit report {path} failed: {'; '.join(report.get('failures', []))}")
    return report, data


# ---------------------------------------------------------------- the checkpoint's files

def checkpoint_files(config_path: Path, stack: Stack) -> dict[str, Path]:
    """Bundle name -> source: config.json, tokenizer.json, the optional tokenizer and
    generation configs, and every LICENSE* / NOTICE* file of the checkpoint folder."""
    folder = config_path.parent
    tokenizer = stack.tokenizer
    if tokenizer is None or not tokenizer.is_file():
        raise BuildError(f"release refused: the checkpoint {folder} has no {TOKENIZER_NAME}; a release ships the "
                         "tokenizer its runners need: add the checkpoint's tokenizer.json and build again")
    files = {CONFIG_NAME: config_path, TOKENIZER_NAME: tokenizer}
    for name in OPTIONAL_FILES:
        if (folder / name).is_file():
            files[name] = folder / name
    for name in license_file_names(folder):
        files[name] = folder / name
    return files


def license_file_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()
                  if p.is_file() and not p.is_symlink() and p.name.upper().startswith(LICENSE_PREFIXES))


def _front_matter(readme: Path) -> dict[str, str]:
    """The simple `key: value` lines of a Hugging Face README's YAML front matter."""
    try:
        text = readme.read_text(errors="replace")
    except OSError:
        return {}
    if not text.startswith("---"):
        return {}
    block = text[3:].split("\n---", 1)[0]
    found = {}
    for line in block.splitlines():
        match = re.fullmatch(r"([A-Za-z_]+):\s*(\S.*?)\s*", line)
        if match:
            found[match.group(1)] = match.group(2).strip("'\"")
    return found


def detect_license(folder: Path, names: list[str]) -> License:
    """The licence id: from the checkpoint's own model card (README.md front matter), else
    recognised from its LICENSE text, else "other" (a file nobody recognised) or "unknown"."""
    declared = _front_matter(folder / "README.md").get("license")
    if declared and re.fullmatch(r"[A-Za-z0-9._-]+", declared):
        return License(declared.lower(), tuple(names), "the checkpoint's README.md front matter")
    for name in names:
        if not name.upper().startswith(("LICENSE", "LICENCE")):
            continue
        try:
            text = (folder / name).read_text(errors="replace")
        except OSError:
            continue
        for license_id, signature in LICENSE_SIGNATURES:
            if all(part in text for part in signature):
                return License(license_id, tuple(names), f"the text of {name}")
        return License(OTHER_LICENSE, tuple(names), f"{name} (not a licence text this release recognises)")
    return License(UNKNOWN_LICENSE, tuple(names), "no licence file or declaration in the checkpoint")


def base_model_of(request: ReleaseRequest, checkpoint_config: dict) -> str | None:
    """BASE_MODEL, else the checkpoint's `_name_or_path` when it is a hub id (never a path)."""
    from .options import HUB_ID
    if request.base_model:
        return request.base_model
    named = checkpoint_config.get("_name_or_path")
    if isinstance(named, str) and "/" in named and HUB_ID.fullmatch(named) and not named.startswith("."):
        return named
    return None


# ---------------------------------------------------------------- all of it

def gather(plan, request: ReleaseRequest) -> ReleaseInputs:
    """Everything the release reads, checked; raises a one-line BuildError on any problem."""
    from ..verify.keys import check_stack_matches
    stack = check_stack_matches(plan)
    stack.require_format("coreml", "doit release")
    keys = package_keys(stack, plan.package_ids())
    verify, verify_bytes, problem = read_verify(plan, request, keys)
    audit, audit_bytes = read_audit(plan, stack, request)
    config_path = plan.settings.CONFIG
    files = checkpoint_files(config_path, stack)
    try:
        checkpoint_config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise BuildError(f"cannot read {config_path}: {exc}") from None
    names = [name for name in files if name.upper().startswith(LICENSE_PREFIXES)]
    license_ = detect_license(config_path.parent, names)
    base_model = base_model_of(request, checkpoint_config)
    model_name = base_model.rsplit("/", 1)[-1] if base_model else config_path.parent.name
    return ReleaseInputs(plan, request, stack, keys, verify, verify_bytes, problem, audit, audit_bytes, files,
                         checkpoint_config, license_, base_model, model_name, build_records(plan, keys))


def build_records(plan, keys: dict) -> dict:
    """What the build recorded when it made each package (bits per weight, ...), from the
    action cache entry of its key: {} for a package whose entry was evicted."""
    from ..build.cache import ActionCache
    cache = ActionCache(plan.tree.cache_dir)
    return {artifact: (cache.read_meta(key) or {}).get("extra", {}) for artifact, key in keys.items()}


def file_digests(files: dict[str, Path]) -> dict[str, str]:
    return {name: digest_bytes(path.read_bytes()) for name, path in sorted(files.items())}
