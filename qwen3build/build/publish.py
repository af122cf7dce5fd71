"""Publishing a whole stack at once: generations and atomic symlink swaps.

A generation is a directory artifacts/.generations/<stack key>/ holding packages/ (the
packages and stack.json), mil/, numerics/, quant/ and coreai/ (the .aimodel packages
with FORMATS=coreai, else empty). OUT_DIR, MIL_DIR, artifacts/numerics, artifacts/quant
and artifacts/coreai are symlinks into the current generation. A new
generation is assembled aside (.<id>.tmp-<pid>-...), fsynced, renamed into place, and
then the links are swapped one by one, OUT_DIR last: each swap is one atomic rename, and
a reader that resolves OUT_DIR sees either the old stack or the new one, whole. A build
that fails or is killed before the swap leaves the published stack as it was.

Published files are copies of cache entries (a copy-on-write clone where the file
system has one, a hard link to the read-only cache file when not running as root, else
a plain copy), checked against the entry's recorded digests while they are made, so a
damaged entry is never published. A write under artifacts/ never reaches the cache.
The previous generation is kept (a runner that opened it keeps working, and flipping
back to it is a link swap); older ones are removed.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import sys
from pathlib import Path

import xxhash

from ..errors import BuildError
from ..paths import GENERATION_FILE, BuildTree
from .cache import READ_CHUNK, TMP_MARK, fsync_dir, fsync_tree, owner_name, remove_path, sweep_orphans
from .faults import crash_point

log = logging.getLogger(__name__)

FOLDERS = ("packages", "mil", "numerics", "quant", "coreai")
KEEP_GENERATIONS = 2  # the current one and the one before


def links(tree: BuildTree) -> dict[str, Path]:
    """Published link -> generation folder it points into; OUT_DIR last (the commit)."""
    return {"mil": tree.mil_dir, "numerics": tree.numerics_dir, "quant": tree.quant_dir, "coreai": tree.coreai_dir,
            "packages": tree.out_dir}


# ---------------------------------------------------------------- reading the current one

def current_generation(tree: BuildTree) -> Path | None:
    """The generation OUT_DIR points into, if it is a complete one."""
    if not tree.out_dir.is_symlink():
        return None
    target = tree.out_dir.resolve()
    generation = target.parent
    if target.name != "packages" or not (generation / GENERATION_FILE).is_file():
        return None
    return generation


def read_generation(generation: Path) -> dict | None:
    try:
        return json.loads((generation / GENERATION_FILE).read_text())
    except (OSError, ValueError):
        return None


def file_intact(path: Path, record: list) -> bool:
    """The published file still has the size, mtime and inode recorded when it was published."""
    try:
        st = path.stat()
    except OSError:
        return False
    size, _digest, mtime_ns, inode = record
    return (st.st_size, st.st_mtime_ns, st.st_ino) == (size, mtime_ns, inode)


def generation_intact(generation: Path, record: dict) -> bool:
    return all(file_intact(generation / rel, entry) for rel, entry in record["files"].items())


def find_generation(tree: BuildTree, generation_id: str) -> Path | None:
    """An intact published generation of that id (id, or id.N), if one is kept."""
    root = tree.generations_dir
    if not root.is_dir():
        return None
    for path in sorted(root.iterdir()):
        if path.name != generation_id and not path.name.startswith(f"{generation_id}."):
            continue
        record = read_generation(path)
        if record and record.get("id") == generation_id and generation_intact(path, record):
            return path
    return None


def links_point_to(tree: BuildTree, generation: Path) -> bool:
    for folder, link in links(tree).items():
        if not link.is_symlink() or link.resolve() != (generation / folder).resolve():
            return False
    return True


# ---------------------------------------------------------------- making files

def _clone(src: Path, dst: Path) -> bool:
    """Copy-on-write clone (APFS clonefile, Linux FICLONE); False where not supported."""
    if sys.platform == "darwin":
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if not hasattr(libc, "clonefile"):
            return False
        return libc.clonefile(os.fsencode(src), os.fsencode(dst), 0) == 0
    if sys.platform.startswith("linux"):
        import fcntl
        ficlone = 0x40049409
        with open(src, "rb") as source, open(dst, "wb") as target:
            try:
                fcntl.ioctl(target.fileno(), ficlone, source.fileno())
                return True
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.EPERM):
                    raise
        dst.unlink(missing_ok=True)
    return False


def _digest_of(path: Path) -> str:
    hasher = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as handle:
        for chunk in iter(lambda: handle.read(READ_CHUNK), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def _copy_checked(src: Path, dst: Path) -> str:
    """Copy src to dst, returning the digest of the bytes copied (one pass)."""
    hasher = xxhash.xxh3_128()
    with open(src, "rb", buffering=0) as source, open(dst, "wb") as target:
        for chunk in iter(lambda: source.read(READ_CHUNK), b""):
            hasher.update(chunk)
            target.write(chunk)
    return hasher.hexdigest()


class DamagedSource(Exception):
    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path


def materialize(src: Path, dst: Path, size: int, digest: str) -> str:
    """Make dst a published copy of the cache file src, checked against (size, digest).
    Returns how: 'clone', 'link' or 'copy'. Raises DamagedSource on a mismatch."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        if src.stat().st_size != size:
            raise DamagedSource(src, f"size {src.stat().st_size}, recorded {size}")
    except FileNotFoundError:
        raise DamagedSource(src, "missing") from None
    if _clone(src, dst):
        how, got = "clone", _digest_of(dst)
    elif hasattr(os, "geteuid") and os.geteuid() != 0 and not (src.stat().st_mode & 0o222):
        # Not root, and the cache file is read-only: a hard link cannot be written through.
        os.link(src, dst)
        how, got = "link", _digest_of(dst)
    else:
        how, got = "copy", _copy_checked(src, dst)
    if got != digest:
        dst.unlink(missing_ok=True)
        raise DamagedSource(src, "content differs from its recorded digest")
    if how == "copy":
        dst.chmod(0o644)
    return how


# ---------------------------------------------------------------- one generation

class GenerationWriter:
    """Assembles a new generation aside; `commit` renames it into place and swaps links."""

    def __init__(self, tree: BuildTree, generation_id: str):
        self.tree = tree
        self.final = tree.generations_dir / generation_id
        self.path = tree.generations_dir / f".{generation_id}{owner_name(TMP_MARK)}"
        self.files: dict[str, list] = {}
        self.ways: dict[str, int] = {}
        for folder in FOLDERS:
            (self.path / folder).mkdir(parents=True, exist_ok=True)

    def add_from_cache(self, src_root: Path, rel_root: str, files: dict[str, list]) -> None:
        """Publish one cache output (files: relative path -> [size, digest]) at rel_root."""
        for rel, (size, digest) in sorted(files.items()):
            target_rel = f"{rel_root}/{rel}" if rel else rel_root
            src = src_root / rel if rel else src_root
            how = materialize(src, self.path / target_rel, size, digest)
            self.ways[how] = self.ways.get(how, 0) + 1
            self._record(target_rel, digest)

    def add_from_generation(self, old: Path, rel_root: str, records: dict[str, list]) -> None:
        """Reuse files of the current generation (unchanged artifacts): hard links between
        generations, never into the cache."""
        for target_rel, record in sorted(records.items()):
            dst = self.path / target_rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(old / target_rel, dst)
            self.ways["reused"] = self.ways.get("reused", 0) + 1
            self._record(target_rel, record[1])

    def add_text(self, rel: str, text: str) -> None:
        path = self.path / rel
        path.write_text(text)
        self._record(rel, _digest_of(path))

    def _record(self, rel: str, digest: str) -> None:
        st = (self.path / rel).stat()
        self.files[rel] = [st.st_size, digest, st.st_mtime_ns, st.st_ino]

    def commit(self, record: dict) -> Path:
        """Seal the generation, rename it into place and swap the links to it.

        The final name is the generation id, or id.N when a generation of that id is
        already there but was found changed (it is pruned later, never overwritten)."""
        (self.path / GENERATION_FILE).write_text(json.dumps({**record, "files": self.files}, indent=1, sort_keys=True))
        fsync_tree(self.path)
        crash_point("publish:assembled")
        final, n = self.final, 0
        while final.exists():
            n += 1
            final = self.final.with_name(f"{self.final.name}.{n}")
        os.rename(self.path, final)
        fsync_dir(final.parent)
        crash_point("publish:renamed")
        swap_links(self.tree, final)
        crash_point("publish:linked")
        return final

    def abandon(self) -> None:
        remove_path(self.path)


def swap_links(tree: BuildTree, generation: Path) -> None:
    """Point every published link into `generation`, OUT_DIR last; each swap is atomic."""
    root = tree.generations_dir.resolve()
    for folder, link in links(tree).items():
        target = generation / folder
        if root in Path(os.path.abspath(link)).parents:
            raise BuildError(f"{link} lies inside {tree.generations_dir}: OUT_DIR / MIL_DIR must name the "
                             "published links (e.g. artifacts/coreml/packages), not a generation")
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() and link.resolve() == target.resolve():
            continue
        if link.exists() and not link.is_symlink():
            _retire_legacy(link)
        relative = os.path.relpath(target, link.parent)
        temporary = link.with_name(f".{link.name}{owner_name(TMP_MARK)}")
        os.symlink(relative, temporary)
        os.replace(temporary, link)
        crash_point("publish:between-links")


def _retire_legacy(path: Path) -> None:
    """A real directory where a link belongs (a build of an older qwen3build): move it
    aside and remove it. Not atomic, and needed once per tree."""
    aside = path.with_name(f".{path.name}.legacy{owner_name(TMP_MARK)}")
    os.rename(path, aside)
    remove_path(aside)
    log.info("replaced the directory %s by a link to the published generation", path)


def prune_generations(tree: BuildTree, keep: Path) -> None:
    """Remove generations other than `keep` and the most recent previous one."""
    root = tree.generations_dir
    if not root.is_dir():
        return
    others = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p != keep),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for old in others[KEEP_GENERATIONS - 1:]:
        remove_path(old)


def sweep(tree: BuildTree) -> list[Path]:
    """Unfinished generations and link temporaries of processes that are gone."""
    return sweep_orphans([tree.generations_dir] + sorted({link.parent for link in links(tree).values()}), TMP_MARK)

