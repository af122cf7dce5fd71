"""Where things are: the repository's own files, and the layout of one build tree.

One home for every path the project derives. Settings (qwen3build.toml < environment <
doit variables) choose OUT_DIR, MIL_DIR, TMP_DIR and CACHE_DIR; everything else in a
build tree is placed relative to them here, and nowhere else.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULTS_FILE = REPO_ROOT / "qwen3build.toml"
DEFAULT_CHECKPOINT_DIR = REPO_ROOT / "assets" / "qwen3-tiny"
HELDOUT_TEXT_PATH = REPO_ROOT / "assets" / "heldout" / "heldout_code.py.txt"

STACK_FILE = "stack.json"        # OUT_DIR/stack.json: what a runner loads
GENERATION_FILE = "generation.json"  # per published generation: keys and file stats


@dataclasses.dataclass(frozen=True)
class BuildTree:
    """The places one build writes. `artifacts` is OUT_DIR's artifacts root: the parent of
    coreml/packages by default, else OUT_DIR's parent."""

    out_dir: Path
    mil_dir: Path
    tmp_dir: Path
    cache_dir: Path

    @property
    def artifacts(self) -> Path:
        parent = self.out_dir.parent
        return parent.parent if parent.name == "coreml" else parent

    # -- published (each a symlink to a directory of the current generation) ----------
    @property
    def numerics_dir(self) -> Path:
        return self.artifacts / "numerics"

    @property
    def quant_dir(self) -> Path:
        return self.artifacts / "quant"

    @property
    def coreai_dir(self) -> Path:
        """The Core AI packages (.aimodel) and their IR text (.mlir), with FORMATS=coreai."""
        return self.artifacts / "coreai"

    @property
    def scales_path(self) -> Path:
        return self.numerics_dir / "slanc_scales.npy"

    def package_path(self, package: str) -> Path:
        return self.out_dir / f"{package}.mlpackage"

    def mil_path(self, package: str) -> Path:
        return self.mil_dir / f"{package}.mil"

    @property
    def generations_dir(self) -> Path:
        """Published generations: OUT_DIR, MIL_DIR, numerics/ and quant/ link into one."""
        return self.artifacts / ".generations"

    # -- private to the build --------------------------------------------------------
    @property
    def state_dir(self) -> Path:
        return self.artifacts / ".state"

    @property
    def lock_path(self) -> Path:
        return self.artifacts / ".lock"

    @property
    def manifest_path(self) -> Path:
        """Per-tensor digests of the checkpoint (what the weights task computes)."""
        return self.state_dir / "weights_manifest.json"

    @property
    def doit_db(self) -> Path:
        return self.state_dir / "doit.sqlite3"

    @property
    def stat_db(self) -> Path:
        """Tensor digests remembered per file under (inode, size, mtime_ns)."""
        return self.cache_dir / "stat.sqlite3"

    @property
    def actions_dir(self) -> Path:
        return self.cache_dir / "actions"

    @property
    def quarantine_dir(self) -> Path:
        return self.cache_dir / "quarantine"

    @property
    def verify_dir(self) -> Path:
        return self.artifacts / "verify"
