"""`doit release`: the Hugging Face release folder of the published stack.

    from qwen3build.release.bundle import make_release
    from qwen3build.release.options import request_from_vars
    result = make_release(plan, request_from_vars(plan.tree, {"BASE_MODEL": "Qwen/Qwen3-1.7B"}))

The folder (RELEASE_DIR/<model>-<recipe>-s<SEQ_LEN>) holds one deterministic zip per
package, the checkpoint's config / tokenizer / generation config and licence files, a
sanitized stack.json, the model card (README.md) and SHA256SUMS. It is assembled aside,
checked for paths of this machine and cache keys, and renamed into place: never
half-written. The release is keyed (release_key) and remembers what it wrote in
<artifacts>/.state/release-*.json, outside the bundle: a second run is up to date.
"""
from __future__ import annotations

import dataclasses
import getpass
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import zipfile
import zlib
from pathlib import Path

from ..build.cache import TMP_MARK, fsync_dir, fsync_tree, owner_name, remove_path, sweep_orphans
from ..build.keys import PACKAGE_DIR, code_digest, digest_bytes, digest_json
from ..errors import BuildError
from ..paths import REPO_ROOT, STACK_FILE
from . import card, zips
from .inputs import ReleaseInputs, file_digests, gather
from .options import ReleaseRequest

log = logging.getLogger(__name__)

RELEASE_FORMAT = 1
CARD_NAME = "README.md"
SUMS_NAME = "SHA256SUMS"
# stack.json fields that name the build machine's inputs (absolute paths, the SLaNC scales
# and packs the torch backend reads, cache keys): a bundle ships none of them.
BUILD_ONLY_FIELDS = ("keys", "weights", "scales", "quant", "checkpoint_config", "tokenizer")
RELEASE_CODE = ("qwen3build.release.bundle",)
READ_CHUNK = 8 << 20
# Path needles shorter than this are not searched for in files copied unchanged from the
# checkpoint (a tokenizer of code may well hold "/src" or "/root" as a token).
MIN_COPIED_NEEDLE = 8


@dataclasses.dataclass
class ReleaseResult:
    destination: Path
    files: dict            # name -> bytes
    status: str            # "released" or "up to date"
    verified: bool
    warnings: list


# ---------------------------------------------------------------- the stack description

def bundle_stack(inputs: ReleaseInputs, zip_sums: dict[str, str], compiled_sums: dict[str, str]) -> dict:
    """The published stack.json without what names the build machine, plus where each
    package's zip is and its SHA-256. Its "files" (sizes and xxh3 of the unzipped package
    files) let load_stack check an unzipped release like a build."""
    info = {k: v for k, v in inputs.stack.info.items() if k not in BUILD_ONLY_FIELDS}
    info["checkpoint_config"] = "config.json"
    info["tokenizer"] = "tokenizer.json"
    info["release"] = {
        "format": RELEASE_FORMAT,
        "verified": inputs.verified,
        "packages": {package: {"zip": f"{package}.zip", "sha256": zip_sums.get(f"{package}.zip")}
                     for package in inputs.stack.package_names},
        "compiled": {name: sha for name, sha in sorted(compiled_sums.items())},
    }
    return info


# ---------------------------------------------------------------- the key

def release_inputs(inputs: ReleaseInputs) -> dict:
    """Everything the bundle's bytes depend on."""
    request = inputs.request
    return {
        "format": RELEASE_FORMAT,
        "packages": inputs.package_keys,
        "stack": bundle_stack(inputs, {}, {}),
        "verify": digest_bytes(inputs.verify_bytes) if inputs.verify_bytes is not None else None,
        "unverified": inputs.unverified[0] if inputs.unverified else None,
        "audit": digest_bytes(inputs.audit_bytes),
        "template": digest_bytes(card.template_text().encode()),
        "code": code_digest(*RELEASE_CODE),
        "checkpoint": file_digests(inputs.checkpoint_files),
        "license": dataclasses.asdict(inputs.license),
        "bits_per_weight": {artifact: record.get("bpw") for artifact, record in inputs.build_records.items()},
        "base_model": inputs.base_model,
        "folder": inputs.folder_name,
        "recipe_description": getattr(inputs.plan.recipe, "description", ""),
        "variables": request.variables(),
        "tools": {"python": platform.python_version(), "zlib": zlib.ZLIB_RUNTIME_VERSION, "platform": sys.platform},
    }


def release_key(inputs: ReleaseInputs) -> str:
    return digest_json(release_inputs(inputs))


def record_path(tree, destination: Path) -> Path:
    """The release's own record, kept outside the bundle (one per destination)."""
    return tree.state_dir / f"release-{digest_bytes(str(destination).encode())[:16]}.json"


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _stats(folder: Path) -> dict[str, list]:
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(folder.iterdir())}


def is_current(plan, request: ReleaseRequest) -> bool:
    """doit uptodate: the folder holds exactly what a release of these inputs wrote."""
    try:
        inputs = gather(plan, request)
        key = release_key(inputs)
    except BuildError:
        return False
    destination = request.release_dir / inputs.folder_name
    record = _read_record(record_path(plan.tree, destination))
    if not record or record.get("key") != key or record.get("destination") != str(destination):
        return False
    try:
        return _stats(destination) == record.get("files")
    except OSError:
        return False


# ---------------------------------------------------------------- where it may go

def check_release_dir(plan, release_dir: Path) -> None:
    """Refuse, in one line, a RELEASE_DIR inside what the build owns or reads."""
    tree, settings = plan.tree, plan.settings
    owned = {
        "the published generations (artifacts/.generations)": tree.generations_dir,
        "OUT_DIR": tree.out_dir, "MIL_DIR": tree.mil_dir, "CACHE_DIR": tree.cache_dir, "TMP_DIR": tree.tmp_dir,
        "the build's state (artifacts/.state)": tree.state_dir, "artifacts/numerics": tree.numerics_dir,
        "artifacts/quant": tree.quant_dir, "the checkpoint folder": settings.CONFIG.parent,
        "the qwen3build package": PACKAGE_DIR,
    }
    target = Path(os.path.abspath(release_dir))
    resolved = release_dir.resolve()
    for what, place in owned.items():
        for candidate in {Path(os.path.abspath(place)), place.resolve()}:
            for mine in (target, resolved):
                if mine == candidate or candidate in mine.parents:
                    raise BuildError(f"RELEASE_DIR={release_dir} lies inside {what} ({place}): choose a folder of "
                                     "its own, e.g. the default artifacts/release")
    if release_dir.exists() and not release_dir.is_dir():
        raise BuildError(f"RELEASE_DIR={release_dir} is a file, not a folder: choose another RELEASE_DIR")


def _check_replaceable(destination: Path) -> None:
    """An existing folder is replaced only when it is a release this tool wrote."""
    if not destination.exists() and not destination.is_symlink():
        return
    try:
        marked = destination.is_dir() and not destination.is_symlink() and (destination / SUMS_NAME).is_file() \
            and "release" in json.loads((destination / STACK_FILE).read_text())
    except (OSError, ValueError, TypeError):
        marked = False
    if not marked:
        raise BuildError(f"{destination} exists and is not a qwen3build release: move it away or choose another "
                         "RELEASE_DIR (a release replaces only a release)")


# ---------------------------------------------------------------- leaks

@dataclasses.dataclass
class Needles:
    """What must appear in no file of the bundle: needle -> what it is."""
    paths: dict        # paths of this machine (repository, artifacts, checkpoint, ...)
    personal: dict     # the home folder and the user name in a path
    keys: dict         # cache keys, the generation id, the reports' keys

    def everything(self) -> dict:
        return {**self.paths, **self.personal, **self.keys}

    def for_copied_files(self) -> dict:
        """Files copied unchanged from the checkpoint: only needles no text holds by chance
        (a tokenizer of code may well hold "/root/" or "/src" as a token)."""
        return {**{n: w for n, w in self.paths.items() if len(n) >= MIN_COPIED_NEEDLE}, **self.keys}


def leak_needles(plan, inputs: ReleaseInputs, stage: Path) -> Needles:
    tree = plan.tree
    places = {"the repository": REPO_ROOT, "the artifacts folder": tree.artifacts, "OUT_DIR": tree.out_dir,
              "CACHE_DIR": tree.cache_dir, "TMP_DIR": tree.tmp_dir,
              "the checkpoint folder": plan.settings.CONFIG.parent,
              "RELEASE_DIR": inputs.request.release_dir, "the staging folder": stage}
    paths = {}
    for what, place in places.items():
        for text in {os.path.abspath(place), str(Path(place).resolve())}:
            if len(text) > 1:
                paths[text.encode()] = f"a path of this machine ({what}: {text})"
    personal = {}
    home = os.path.expanduser("~")
    if home not in ("", "/"):
        personal[(home.rstrip("/") + "/").encode()] = f"the home folder of this machine ({home})"
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = ""
    if user:
        personal[f"/{user}/".encode()] = f"the user name {user!r} in a path"
    keys = {}
    for artifact, key in (inputs.stack.info.get("keys") or {}).items():
        keys[str(key).encode()] = f"the cache key of {artifact}"
    generation = inputs.stack.models_dir.parent
    if generation.parent == tree.generations_dir.resolve():
        keys[generation.name.split(".")[0].encode()] = "the published generation's id"
    for report, what in ((inputs.verify, "the verify report's key"), (inputs.audit, "the audit report's key")):
        if report and report.get("key"):
            keys[str(report["key"]).encode()] = what
    return Needles(paths, personal, keys)


def _chunks(handle):
    for chunk in iter(lambda: handle.read(READ_CHUNK), b""):
        yield chunk


def _find(chunks, needles: dict) -> str | None:
    """What the first needle found in a stream of chunks is (None: none)."""
    if not needles:
        return None
    overlap = max(len(n) for n in needles) - 1
    tail = b""
    for chunk in chunks:
        window = tail + chunk
        for needle, what in needles.items():
            if needle in window:
                return what
        tail = window[-overlap:] if overlap else b""
    return None


def check_no_leaks(stage: Path, copied: set[str], needles: Needles) -> None:
    """Search every file of the staged bundle, and every entry inside its zips (name and
    bytes), for paths of this machine, the user name and cache keys; refuse in one line."""
    everything = needles.everything()
    for path in sorted(stage.iterdir()):
        with open(path, "rb") as handle:
            found = _find(_chunks(handle), needles.for_copied_files() if path.name in copied else everything)
        if found is None and path.suffix == ".zip":
            with zipfile.ZipFile(path) as archive:
                for entry in archive.infolist():
                    found = _find([entry.filename.encode()], everything)
                    if found is None and not entry.is_dir():
                        with archive.open(entry) as handle:
                            found = _find(_chunks(handle), everything)
                    if found:
                        found = f"{found}, in {entry.filename}"
                        break
        if found:
            hint = ("remove it from the checkpoint's file" if path.name in copied
                    else "this is a qwen3build bug: please report it")
            raise BuildError(f"release refused: {path.name} would carry {found}; {hint}")


# ---------------------------------------------------------------- writing

def sha256_of(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in _chunks(handle):
            hasher.update(chunk)
    return hasher.hexdigest()


def _write_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}{owner_name(TMP_MARK)}")
    partial.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(partial, path)


def _compile_all(plan, inputs: ReleaseInputs, stage: Path) -> dict[str, str]:
    """macOS, RELEASE_COMPILED=1: name.mlmodelc.zip per package, beside the package zips."""
    scratch = plan.tree.tmp_dir / f"release{owner_name(TMP_MARK)}"
    sums = {}
    try:
        for package in inputs.stack.package_names:
            compiled = zips.compile_package(inputs.stack.package(package), scratch)
            target = stage / f"{compiled.name}.zip"
            zips.zip_tree(compiled, target)
            sums[target.name] = sha256_of(target)
    finally:
        remove_path(scratch)
    return sums


def assemble(plan, inputs: ReleaseInputs, stage: Path) -> list[str]:
    """Write every file of the bundle into `stage`; returns the warnings."""
    warnings = []
    stack = inputs.stack
    zip_sums = {}
    for package in stack.package_names:
        target = stage / f"{package}.zip"
        zips.zip_tree(stack.package(package), target)
        zip_sums[target.name] = sha256_of(target)
        log.info("zipped %s (%s bytes)", target.name, f"{target.stat().st_size:,}")
    compiled_sums = _compile_all(plan, inputs, stage) if inputs.request.compiled else {}
    for name, source in inputs.checkpoint_files.items():
        shutil.copyfile(source, stage / name)
    (stage / STACK_FILE).write_text(json.dumps(bundle_stack(inputs, zip_sums, compiled_sums), indent=1,
                                               sort_keys=True) + "\n")
    sizes = {p.name: p.stat().st_size for p in stage.iterdir()}
    (stage / CARD_NAME).write_text(card.render(inputs, sizes))
    if not inputs.license.files:
        warnings.append(f"the checkpoint {plan.settings.CONFIG.parent.name} has no LICENSE or NOTICE file: the "
                        "release ships none and its card says so; find the checkpoint's terms before publishing it")
    if not inputs.verified:
        warnings.append(f"RELEASE_UNVERIFIED=1: {inputs.unverified[1]}; the card says at its top that the "
                        "packages were not verified")
    check_no_leaks(stage, set(inputs.checkpoint_files), leak_needles(plan, inputs, stage))
    names = sorted(p.name for p in stage.iterdir())
    (stage / SUMS_NAME).write_text("".join(f"{sha256_of(stage / name)}  {name}\n" for name in names))
    for path in stage.iterdir():
        path.chmod(0o644)
    return warnings


def make_release(plan, request: ReleaseRequest) -> ReleaseResult:
    """Check every input, assemble the bundle aside, and rename it into place."""
    inputs = gather(plan, request)
    check_release_dir(plan, request.release_dir)
    if request.compiled and not zips.compiled_supported():
        raise BuildError(f"RELEASE_COMPILED=1 needs macOS (xcrun coremlcompiler); this is {sys.platform}: release "
                         "without it, or run the release on a Mac")
    key = release_key(inputs)
    destination = request.release_dir / inputs.folder_name
    _check_replaceable(destination)
    request.release_dir.mkdir(parents=True, exist_ok=True)
    sweep_orphans([request.release_dir], TMP_MARK)
    stage = request.release_dir / f".{inputs.folder_name}{owner_name(TMP_MARK)}"
    stage.mkdir()
    try:
        warnings = assemble(plan, inputs, stage)
        fsync_tree(stage)
        if destination.exists():
            old = request.release_dir / f".{inputs.folder_name}.old{owner_name(TMP_MARK)}"
            os.rename(destination, old)
            os.rename(stage, destination)
            remove_path(old)
        else:
            os.rename(stage, destination)
        fsync_dir(request.release_dir)
    except BaseException:
        remove_path(stage)
        raise
    _write_record(record_path(plan.tree, destination),
                  {"format": RELEASE_FORMAT, "key": key, "destination": str(destination),
                   "files": _stats(destination)})
    for warning in warnings:
        log.warning("%s", warning)
    files = {p.name: p.stat().st_size for p in sorted(destination.iterdir())}
    return ReleaseResult(destination, files, "released", inputs.verified, warnings)


def format_result(result: ReleaseResult) -> str:
    width = max(len(name) for name in result.files)
    lines = [f"release {'(verified)' if result.verified else '(NOT verified: RELEASE_UNVERIFIED=1)'}: "
             f"{result.destination}"]
    lines += [f"  {name:<{width}}  {size:>14,} bytes" for name, size in result.files.items()]
    lines.append(f"  {'total':<{width}}  {sum(result.files.values()):>14,} bytes")
    return "\n".join(lines)
