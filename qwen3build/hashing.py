"""Action keys: xxh3_128 over exactly what an artifact reads.

A key covers the artifact's tensor digests, its slice of the settings, the source of the
code that makes it (the module and every qwen3build module it imports, found by reading
the import statements), and the versions of the tools that shape its bytes.
"""
from __future__ import annotations

import ast
import functools
import json
import platform
from importlib import metadata
from pathlib import Path

import xxhash

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGE = PACKAGE_DIR.name
TOOLS = ("coremltools", "numpy", "torch", "safetensors")


def digest_bytes(*parts: bytes) -> str:
    hasher = xxhash.xxh3_128()
    for part in parts:
        hasher.update(part)
    return hasher.hexdigest()


def digest_json(obj) -> str:
    """Digest of a JSON-able object, independent of dict ordering."""
    return digest_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode())


def _module_file(module: str) -> Path | None:
    rel = module.split(".")[1:]
    base = PACKAGE_DIR.joinpath(*rel)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports_of(module: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    package_parts = module.split(".") if is_pkg else module.split(".")[:-1]
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


@functools.lru_cache(maxsize=None)
def module_closure(module: str) -> tuple[str, ...]:
    """The module and every qwen3build module it imports, transitively, sorted."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(2, len(parts)))  # parent packages run first
        todo.extend(_imports_of(name, path) - seen)
    return tuple(sorted(seen))


@functools.lru_cache(maxsize=None)
def code_digest(*modules: str) -> str:
    names = sorted({m for module in modules for m in module_closure(module)})
    return digest_bytes(*(f"{m}\0".encode() + _module_file(m).read_bytes() for m in names))


@functools.lru_cache(maxsize=None)
def tool_versions() -> dict:
    versions = {"python": platform.python_version()}
    for tool in TOOLS:
        try:
            versions[tool] = metadata.version(tool)
        except metadata.PackageNotFoundError:
            versions[tool] = None
    return versions


def action_key(kind: str, *, code: tuple[str, ...], settings: dict, tensors: dict, inputs: dict | None = None) -> str:
    """The key of one artifact: what it is, what makes it, and what it reads."""
    return digest_json({
        "kind": kind,
        "code": code_digest(*code),
        "tools": tool_versions(),
        "settings": settings,
        "tensors": tensors,
        "inputs": inputs or {},
    })
