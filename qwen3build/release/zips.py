"""Deterministic zips of saved packages, and (macOS) of their compiled form.

Two zips of the same package are byte-identical: entries in sorted order (each folder
before what it holds, folders included so an unzip recreates empty ones), a fixed
timestamp, fixed Unix permissions, no extra fields, DEFLATE at a fixed level, and each
entry streamed with its size known up front (no data descriptors). The compressed bytes
depend on zlib's version: two machines with different zlib builds may compress
differently; one machine always writes the same bytes.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from ..errors import BuildError

log = logging.getLogger(__name__)

ZIP_DATE = (1980, 1, 1, 0, 0, 0)   # the earliest date a zip can hold
FILE_MODE = 0o100644               # regular file, rw-r--r--
DIR_MODE = 0o040755                # directory, rwxr-xr-x
MSDOS_DIRECTORY = 0x10
UNIX = 3                           # "version made by" host: the permissions are Unix modes
COMPRESS_LEVEL = 6                 # zlib's default trade-off; fixed so the bytes are too
COPY_CHUNK = 8 << 20


def _entry(name: str, is_dir: bool, size: int = 0) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
    info.create_system = UNIX
    if is_dir:
        info.external_attr = (DIR_MODE << 16) | MSDOS_DIRECTORY
        info.compress_type = zipfile.ZIP_STORED
    else:
        info.external_attr = FILE_MODE << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        info.file_size = size  # known up front: the local header is final, no data descriptor
        # The level's attribute is compress_level from Python 3.13, _compresslevel before.
        setattr(info, "compress_level" if hasattr(zipfile.ZipInfo, "compress_level") else "_compresslevel",
                COMPRESS_LEVEL)
    return info


def tree_entries(root: Path) -> list[tuple[str, Path]]:
    """(archive name, path) for root and everything under it, sorted; names start with
    root's own name, so `unzip x.mlpackage.zip` recreates x.mlpackage/. Folders end in '/'."""
    root = Path(root)
    entries = [(f"{root.name}/", root)]
    for path in root.rglob("*"):
        if path.is_symlink():
            raise BuildError(f"{path} is a symbolic link: a package to release must hold only files and folders")
        rel = path.relative_to(root.parent).as_posix()
        entries.append((f"{rel}/" if path.is_dir() else rel, path))
    return sorted(entries)


def zip_tree(root: Path, target: Path) -> None:
    """Write target (.zip) holding the folder root, deterministically."""
    with zipfile.ZipFile(target, "w", allowZip64=True) as archive:
        for name, path in tree_entries(root):
            if name.endswith("/"):
                archive.writestr(_entry(name, True), b"")
                continue
            info = _entry(name, False, path.stat().st_size)
            with open(path, "rb") as source, archive.open(info, "w") as sink:
                shutil.copyfileobj(source, sink, COPY_CHUNK)


# ---------------------------------------------------------------- compiled models (macOS)

COMPILED_SUFFIX = ".mlmodelc"


def compiled_supported() -> bool:
    return sys.platform == "darwin"


def compile_package(package: Path, out_dir: Path) -> Path:
    """`xcrun coremlcompiler compile package out_dir`: the .mlmodelc an app bundles."""
    if not compiled_supported():
        raise BuildError(f"RELEASE_COMPILED=1 needs macOS (xcrun coremlcompiler); this is {sys.platform}: "
                         "release without it, or run the release on a Mac")
    if shutil.which("xcrun") is None:
        raise BuildError("RELEASE_COMPILED=1 needs xcrun (Xcode command line tools): install them with "
                         "`xcode-select --install`, or release without RELEASE_COMPILED")
    out_dir.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["xcrun", "coremlcompiler", "compile", str(package), str(out_dir)],
                            capture_output=True, text=True)
    compiled = out_dir / (package.name[: -len(".mlpackage")] + COMPILED_SUFFIX)
    if result.returncode != 0 or not compiled.is_dir():
        first = (result.stderr or result.stdout or "no output").strip().splitlines()
        raise BuildError(f"xcrun coremlcompiler could not compile {package.name}: "
                         f"{first[0] if first else 'no output'}")
    log.info("compiled %s", compiled.name)
    return compiled
