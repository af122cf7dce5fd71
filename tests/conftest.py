"""Shared fixtures: tiny random Qwen3 checkpoints of several shapes, and a doit driver."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tinymodel.synth import write_random_qwen3_checkpoint

REPO = Path(__file__).resolve().parent.parent

# Shapes the default checkpoint never uses: head_dim != hidden/heads with GQA, plain MHA
# with an untied head, a single KV head.
TINY_SHAPES = {
    "gqa": dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True),
    "untied_mha": dict(vocab_size=257, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                       num_attention_heads=3, num_key_value_heads=3, head_dim=16, tie_word_embeddings=False),
    # Output dims multiples of 128, for GS128 LUT recipes.
    "q128": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True),
    "mqa6": dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                 num_attention_heads=4, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True),
}


def make_checkpoint(directory: Path, shape: str = "gqa", dtype: str = "bfloat16", seed: int = 0,
                    max_shard_bytes: int | None = None, **overrides) -> Path:
    config = {**TINY_SHAPES[shape], "max_position_embeddings": 512, **overrides}
    write_random_qwen3_checkpoint(directory, config, dtype=dtype, max_shard_bytes=max_shard_bytes, seed=seed)
    return directory / "config.json"


@pytest.fixture(scope="session")
def gqa_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt_gqa"), "gqa")


class DoitWorkspace:
    """Runs the real dodo.py in a subprocess with all outputs under one directory."""

    def __init__(self, root: Path, config: Path):
        self.root, self.config = root, config
        root.mkdir(parents=True, exist_ok=True)
        self.out_dir = root / "artifacts" / "coreml" / "packages"
        self.state_dir = root / "artifacts" / ".state"
        # The builds' TMPDIR: a library's temporaries left behind show here (tests/test_crash.py).
        self.system_tmp = root / "system-tmp"
        self.system_tmp.mkdir(exist_ok=True)

    def paths(self) -> dict:
        # fp16 unless a test asks: the tiny shapes are not multiples of the LUT group size.
        return {"CONFIG": str(self.config), "SEQ_LEN": "32", "RECIPE": "fp16", "OUT_DIR": str(self.out_dir),
                "MIL_DIR": str(self.root / "artifacts/coreml/mil"),
                "TMP_DIR": str(self.root / "artifacts/.tmp"), "CACHE_DIR": str(self.root / "cache")}

    def doit(self, *args: str, check: bool = True, env_extra: dict | None = None, launcher: tuple = ("-m", "doit"),
             **variables) -> subprocess.CompletedProcess:
        """launcher: how the interpreter starts doit (e.g. ("-c", code) running doit after a change)."""
        self.run_id = uuid.uuid4().hex
        env = {k: v for k, v in os.environ.items() if k not in ("SEQ_LEN", "SHARDS", "CONFIG", "RECIPE")}
        env["QWEN3BUILD_RUN_ID"] = self.run_id
        env["PYTHONPATH"] = str(REPO)  # this checkout's qwen3build, whatever the venv has installed
        env["TMPDIR"] = str(self.system_tmp)
        env.update(env_extra or {})
        assignments = [f"{k}={v}" for k, v in {**self.paths(), **variables}.items()]
        result = subprocess.run([sys.executable, *launcher, "-f", str(REPO / "dodo.py"), *args, *assignments],
                                cwd=self.root, env=env, capture_output=True, text=True, timeout=600)
        if check and result.returncode != 0:
            raise AssertionError(f"doit {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def state(self, artifact_id: str) -> dict:
        path = self.state_dir / f"{artifact_id.replace(':', '__')}.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def status(self, artifact_id: str) -> str:
        """rebuilt / restored in the last run, else 'up to date' (or 'missing')."""
        state = self.state(artifact_id)
        if not state:
            return "missing"
        return state["status"] if state.get("run_id") == self.run_id else "up to date"


@pytest.fixture
def workspace(tmp_path, gqa_checkpoint) -> DoitWorkspace:
    return DoitWorkspace(tmp_path, gqa_checkpoint)


@pytest.fixture(scope="session")
def built_stack(tmp_path_factory, gqa_checkpoint) -> DoitWorkspace:
    """The gqa checkpoint built once through doit (SEQ_LEN 32), shared read-only."""
    ws = DoitWorkspace(tmp_path_factory.mktemp("built_gqa"), gqa_checkpoint)
    ws.doit("build")
    return ws
