"""Action keys: xxh3_128 over exactly what an artifact reads (see declare.py).

A key covers the artifact's declared inputs: its tensor digests, its slice of the
settings and model config, the content digests of the upstream outputs it reads, the
code that makes it and the versions of the tools that shape its bytes.

The code part is the artifact's build module and every qwen3build module it imports,
transitively (found by reading import statements, including ones inside functions).
Each module counts by its syntax tree with docstrings removed: editing a comment or a
docstring changes no bytes and rebuilds nothing; editing code does.
"""
from __future__ import annotations

import ast
import functools
import json
import os
import platform
from importlib import metadata
from pathlib import Path

import xxhash

PACKAGE_DIR = Path(__file__).resolve().parent.parent
PACKAGE = PACKAGE_DIR.name


def digest_bytes(*parts: bytes) -> str:
    hasher = xxhash.xxh3_128()
    for part in parts:
        hasher.update(part)
    return hasher.hexdigest()


def digest_json(obj) -> str:
    """Digest of a JSON-able object, independent of dict ordering."""
    return digest_bytes(canonical_json(obj).encode())


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_not_json)


def _not_json(value):
    raise TypeError(f"a declared input must be JSON data (str, int, float, bool, None, list, dict), "
                    f"not {type(value).__name__}: {value!r}")


def module_file(module: str) -> Path | None:
    rel = module.split(".")[1:]
    base = PACKAGE_DIR.joinpath(*rel)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports_of(module: str, tree: ast.AST, is_package: bool) -> set[str]:
    package_parts = module.split(".") if is_package else module.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)  # submodules imported by name
    return found


# Parsing every module for each key costs more than the rest of a no-op build: facts are
# remembered per module under the digest of its source bytes, in memory and (when a build
# says where) on disk, so a no-op reads ~60 small files and parses none.
_facts: dict[str, tuple[str, tuple[str, ...], str]] = {}  # module -> (source digest, imports, code digest)
_disk_path: Path | None = None
_disk_loaded = False


def use_disk_cache(path: Path) -> None:
    """Remember module facts in `path` (a JSON file) across processes."""
    global _disk_path, _disk_loaded
    _disk_path, _disk_loaded = path, False


def _load_disk() -> None:
    global _disk_loaded
    if _disk_loaded or _disk_path is None:
        return
    _disk_loaded = True
    try:
        stored = json.loads(_disk_path.read_text())
    except (OSError, ValueError):
        return
    for module, (source, imports, digest) in stored.items():
        _facts.setdefault(module, (source, tuple(imports), digest))


def _save_disk() -> None:
    if _disk_path is None:
        return
    try:
        _disk_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _disk_path.with_name(f".{_disk_path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({m: list(f) for m, f in sorted(_facts.items())}))
        os.replace(tmp, _disk_path)
    except OSError:
        pass  # a cache of facts: losing it costs only time


def _module_facts(module: str) -> tuple[tuple[str, ...], str]:
    """(qwen3build modules it imports, digest of its code) for one module."""
    path = module_file(module)
    source = path.read_bytes()
    source_digest = digest_bytes(source)
    _load_disk()
    known = _facts.get(module)
    if known and known[0] == source_digest:
        return known[1], known[2]
    tree = ast.parse(source, filename=str(path))
    imports = tuple(sorted(_imports_of(module, tree, path.name == "__init__.py")))
    tree = _strip_docstrings(tree)
    digest = digest_bytes(module.encode(), b"\0", ast.dump(tree, include_attributes=False).encode())
    _facts[module] = (source_digest, imports, digest)
    _save_disk()
    return imports, digest


def module_closure(module: str) -> tuple[str, ...]:
    """The module and every qwen3build module it imports, transitively, sorted."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if module_file(name) is None:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(2, len(parts)))  # parent packages run first
        todo.extend(set(_module_facts(name)[0]) - seen)
    return tuple(sorted(seen))


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def module_digest(module: str) -> str:
    """Digest of one module's code: its syntax tree without docstrings or positions."""
    return _module_facts(module)[1]


@functools.lru_cache(maxsize=None)
def code_digest(*modules: str) -> str:
    names = sorted({m for module in modules for m in module_closure(module)})
    return digest_json({name: module_digest(name) for name in names})


@functools.lru_cache(maxsize=None)
def tool_versions(tools: tuple[str, ...]) -> dict:
    """Python's version and each distribution's installed version (None: not installed)."""
    versions = {"python": platform.python_version()}
    for tool in tools:
        try:
            versions[tool] = metadata.version(tool)
        except metadata.PackageNotFoundError:
            versions[tool] = None
    return versions
