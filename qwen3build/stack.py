"""The deployment description (OUT_DIR/stack.json): written by the build, read by `run`,
`verify`, `audit` and `release`. One home for its format, its loader and the compute
units of each package kind.

A published stack is one generation directory (build/publish.py) holding packages/ with
the packages and stack.json, beside mil/, numerics/ and quant/. stack.json records each
package's file sizes and digests, so a reader can tell a complete stack of one build from
anything else, and refuse it in one line.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .errors import BuildError
from .paths import STACK_FILE

FORMAT = 2
# Compute units per package kind on Core ML (DESIGN section 1).
COMPUTE_UNITS = {"io_model": "CPU_AND_GPU", "shard": "CPU_AND_NE", "sampler": "CPU_AND_GPU"}
PACKAGE_SUFFIX = ".mlpackage"
# Preferred compute unit of a Core AI stack on macOS 27's runtime (COREAI_COMPUTE_UNIT);
# "default" lets the runtime choose, and is the only one Linux's runtime accepts.
COREAI_COMPUTE_UNITS = ("default", "cpu", "gpu", "neural_engine")


@dataclasses.dataclass(frozen=True)
class Stack:
    """A built deployment, as OUT_DIR/stack.json describes it."""

    models_dir: Path   # the folder holding stack.json (resolved: a generation's packages/)
    info: dict

    @property
    def seq_len(self) -> int:
        return int(self.info["seq_len"])

    @property
    def model(self) -> dict:
        return self.info["model"]

    @property
    def vocab_size(self) -> int:
        return int(self.info["model"]["vocab_size"])

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return tuple(int(t) for t in self.info["model"].get("eos_token_ids") or ())

    @property
    def recipe(self) -> str:
        return self.info["recipe"]

    @property
    def prefill_len(self) -> int:
        """Tokens per call of the shards' `prefill` function; 0: decode only (also a stack
        from before prefill, which records none)."""
        return int(self.info.get("prefill_len") or 0)

    def functions(self, package: str) -> list[str]:
        """The functions stack.json records for `package` (a file name), default first; []
        when it records none (a stack from before prefill)."""
        return list((self.info.get("functions") or {}).get(package) or [])

    @property
    def shards(self) -> list[dict]:
        return self.info["shards"]

    @property
    def layout_text(self) -> str:
        """The SHARDS setting that reproduces this stack's layout."""
        return ",".join(f"{s['name']}:{s['first']}-{s['last']}" for s in self.shards)

    def relative(self, name: str) -> Path | None:
        """A path stack.json records relative to models_dir (None when absent)."""
        value = self.info.get(name)
        return (self.models_dir / value).resolve() if value else None

    @property
    def tokenizer(self) -> Path | None:
        return self.relative("tokenizer")

    @property
    def checkpoint_config(self) -> Path | None:
        return self.relative("checkpoint_config")

    @property
    def scales_path(self) -> Path | None:
        return self.relative("scales")

    @property
    def quant_dir(self) -> Path | None:
        return self.relative("quant")

    def package(self, relative: str) -> Path:
        return self.models_dir / relative

    @property
    def io_model(self) -> Path:
        return self.package(self.info["io_model"])

    @property
    def sampler(self) -> Path:
        return self.package(self.info["sampler"])

    @property
    def shard_packages(self) -> list[Path]:
        return [self.package(shard["package"]) for shard in self.shards]

    @property
    def is_release(self) -> bool:
        """An unzipped release bundle (qwen3build.release): packages, tokenizer and config
        beside stack.json, and none of the build's inputs (weights, SLaNC scales, packs)."""
        return "release" in self.info

    @property
    def formats(self) -> tuple[str, ...]:
        """The package formats published (FORMATS); a stack from before Core AI is Core ML."""
        return tuple(self.info.get("formats") or ("coreml",))

    def require_format(self, fmt: str, what: str) -> None:
        """Refuse, in one line, to run `what` on a stack built without `fmt`."""
        if fmt not in self.formats:
            raise BuildError(f"{what} needs the {fmt} packages, but {self.models_dir} was built with "
                             f"FORMATS={','.join(self.formats)}: build with FORMATS=coreml,coreai")

    @property
    def coreai(self) -> dict | None:
        """The "coreai" section (FORMATS with coreai): .aimodel paths relative to stack.json,
        {"io_model", "sampler", "shards": [...], "functions": {path: [...]}, "states":
        {shard path: {state name: {"shape", "dtype"}}}}."""
        section = self.info.get("coreai")
        return section if isinstance(section, dict) else None

    @property
    def package_names(self) -> list[str]:
        return [self.info["io_model"]] + [s["package"] for s in self.shards] + [self.info["sampler"]]


def load_stack(models_dir: Path, check_files: bool = True) -> Stack:
    """Read models_dir/stack.json; with check_files, every file it lists must be present
    with its recorded size (a stack mixed from two builds or cut short is refused)."""
    models_dir = Path(models_dir)
    path = models_dir / STACK_FILE
    if not path.is_file():
        what = "does not exist" if not models_dir.exists() else f"has no {STACK_FILE}"
        raise BuildError(f"models dir {models_dir} {what}: build first (`./dev build`, or `doit build` with "
                         f"your settings), or point --models-dir at a build's OUT_DIR")
    try:
        info = json.loads(path.read_text())
        if info.get("format") != FORMAT:
            raise ValueError(f"format {info.get('format')!r}, this qwen3build reads format {FORMAT}")
        for key in ("seq_len", "model", "io_model", "sampler", "shards", "files"):
            info[key]
        info["model"]["vocab_size"]
        if isinstance(info.get("prefill_len", 0), bool) or int(info.get("prefill_len") or 0) < 0:
            raise ValueError(f"prefill_len {info['prefill_len']!r} is not a whole number >= 0")
    except (ValueError, KeyError, TypeError) as exc:
        raise BuildError(f"{path} is not a qwen3build stack description ({exc}); rebuild with `./dev build`") from None
    stack = Stack(models_dir.resolve(), info)
    if check_files:
        check_stack_files(stack)
    return stack


def check_stack_files(stack: Stack) -> None:
    """Every file stack.json lists is present with its recorded size (cheap: stat only)."""
    for package, files in stack.info["files"].items():
        root = stack.models_dir / package
        if not root.is_dir() and stack.is_release:
            raise BuildError(f"{root} is missing: unzip the release's packages first "
                             f"(`cd {stack.models_dir} && unzip -q '*.zip'`)")
        if not root.is_dir():
            raise BuildError(f"{root} is missing: {stack.models_dir} is not a complete stack; run `./dev build` again")
        for rel, (size, _digest) in files.items():
            target = root / rel
            try:
                actual = target.stat().st_size
            except OSError:
                raise BuildError(f"{target} is missing: {stack.models_dir} is not a complete stack; "
                                 "run `./dev build` again") from None
            if actual != size:
                raise BuildError(f"{target} has {actual} bytes, stack.json records {size}: the stack was changed "
                                 "after it was built; run `./dev build` again")
