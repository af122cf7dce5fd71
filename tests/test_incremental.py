"""Content-hashed, incremental, cached: each promise of the build, driven through doit."""
import hashlib
import os
import time

import pytest

from qwen3build.checkpoint.reader import read_safetensors_header

from conftest import DoitWorkspace, make_checkpoint

PACKAGES = ["io_model", "shard:left", "shard:mid", "shard:right", "sampler_model"]
SEQ_A, SEQ_B = 32, 48
PREFILL_A, PREFILL_B = 8, 16
# A restore hard-links files out of cache/: far below a rebuild even on a busy machine.
RESTORE_SECONDS_LIMIT = 20.0


def statuses(ws, ids=PACKAGES):
    return {artifact: ws.status(artifact) for artifact in ids}


def tree_digest(path):
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def test_noop_build_rebuilds_nothing_and_reads_no_weights(workspace):
    workspace.doit("build", SEQ_LEN=SEQ_A)
    assert set(statuses(workspace).values()) == {"rebuilt"}
    assert workspace.state("weights")["bytes_hashed"] > 0
    second = workspace.doit("build", SEQ_LEN=SEQ_A)
    assert set(statuses(workspace).values()) == {"up to date"}
    assert workspace.status("weights") == "up to date"  # the weights action did not even run
    assert "-- weights" in second.stdout
    assert "up to date" in second.stdout and "rebuilt" not in second.stdout


def test_seq_len_change_rebuilds_shards_only_and_flip_back_is_a_restore(workspace):
    # PREFILL_LEN given: its default (64) is fitted to a SEQ_LEN below it, which would key
    # the io_model on these small SEQ_LENs too (docs/prefill.md).
    workspace.doit("build", SEQ_LEN=SEQ_A, PREFILL_LEN=PREFILL_A)
    first = {name: tree_digest(workspace.out_dir / f"{name}.mlpackage")
             for name in ("decoder_shard_left", "decoder_shard_mid", "decoder_shard_right")}
    workspace.doit("build", SEQ_LEN=SEQ_B, PREFILL_LEN=PREFILL_A)
    assert statuses(workspace) == {"io_model": "up to date", "shard:left": "rebuilt", "shard:mid": "rebuilt",
                                   "shard:right": "rebuilt", "sampler_model": "up to date"}
    assert workspace.status("slanc") == "up to date"
    started = time.perf_counter()
    workspace.doit("build", SEQ_LEN=SEQ_A, PREFILL_LEN=PREFILL_A)
    elapsed = time.perf_counter() - started
    assert statuses(workspace, ["shard:left", "shard:mid", "shard:right"]) == dict.fromkeys(
        ["shard:left", "shard:mid", "shard:right"], "restored")
    assert elapsed < RESTORE_SECONDS_LIMIT
    for name, digest in first.items():
        assert tree_digest(workspace.out_dir / f"{name}.mlpackage") == digest, name


def test_prefill_len_change_rebuilds_shards_and_io_model_only_and_flip_back_is_a_restore(workspace):
    packages = ("io_model", "decoder_shard_left", "decoder_shard_mid", "decoder_shard_right")
    workspace.doit("build", PREFILL_LEN=PREFILL_A)
    first = {name: tree_digest(workspace.out_dir / f"{name}.mlpackage") for name in packages}
    workspace.doit("build", PREFILL_LEN=PREFILL_B)
    assert statuses(workspace) == {"io_model": "rebuilt", "shard:left": "rebuilt", "shard:mid": "rebuilt",
                                   "shard:right": "rebuilt", "sampler_model": "up to date"}
    assert workspace.status("slanc") == "up to date"
    workspace.doit("build", PREFILL_LEN="0")  # decode only: rebuilt, a third stack
    assert workspace.status("io_model") == "rebuilt"
    started = time.perf_counter()
    workspace.doit("build", PREFILL_LEN=PREFILL_A)
    elapsed = time.perf_counter() - started
    assert statuses(workspace, ["io_model", "shard:left", "shard:mid", "shard:right"]) == dict.fromkeys(
        ["io_model", "shard:left", "shard:mid", "shard:right"], "restored")
    assert workspace.status("sampler_model") == "up to date"
    assert elapsed < RESTORE_SECONDS_LIMIT
    for name, digest in first.items():
        assert tree_digest(workspace.out_dir / f"{name}.mlpackage") == digest, name


def test_moving_the_mid_right_boundary_rebuilds_mid_and_right_only(tmp_path):
    ws = DoitWorkspace(tmp_path, make_checkpoint(tmp_path / "ckpt", "mqa6"))
    ws.doit("build", SEQ_LEN=SEQ_A, SHARDS="left:0-1,mid:2-3,right:4-5")
    ws.doit("build", SEQ_LEN=SEQ_A, SHARDS="left:0-1,mid:2-4,right:5-5")
    assert statuses(ws) == {"io_model": "up to date", "shard:left": "up to date", "shard:mid": "rebuilt",
                            "shard:right": "rebuilt", "sampler_model": "up to date"}


def test_changing_one_tensor_rebuilds_only_the_shard_holding_it(tmp_path):
    ws = DoitWorkspace(tmp_path, make_checkpoint(tmp_path / "ckpt", "gqa"))  # preset: left 0-1, mid 2, right 3
    ws.doit("build", SEQ_LEN=SEQ_A)
    weights = tmp_path / "ckpt" / "model.safetensors"
    entry = read_safetensors_header(weights)["model.layers.2.mlp.up_proj.weight"]
    with open(weights, "r+b") as handle:  # nudge one bf16 value by one unit in the last place
        handle.seek(entry.begin)
        low = handle.read(1)[0]
        handle.seek(entry.begin)
        handle.write(bytes([low ^ 1]))
    ws.doit("build", SEQ_LEN=SEQ_A)
    assert ws.status("weights") == "rebuilt"
    assert statuses(ws) == {"io_model": "up to date", "shard:left": "up to date", "shard:mid": "rebuilt",
                            "shard:right": "up to date", "sampler_model": "up to date"}


def test_touch_rebuilds_nothing_and_later_runs_do_not_hash_again(tmp_path):
    ws = DoitWorkspace(tmp_path, make_checkpoint(tmp_path / "ckpt", "gqa"))
    ws.doit("build", SEQ_LEN=SEQ_A)
    weights = tmp_path / "ckpt" / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    ws.doit("build", SEQ_LEN=SEQ_A)
    assert ws.status("weights") == "rebuilt" and ws.state("weights")["bytes_hashed"] > 0
    assert set(statuses(ws).values()) == {"up to date"}
    third = ws.doit("build", SEQ_LEN=SEQ_A)
    assert ws.status("weights") == "up to date" and "-- weights" in third.stdout


def test_single_shard_task_builds_only_what_it_needs(workspace):
    workspace.doit("shard:mid", SEQ_LEN=SEQ_A)
    assert workspace.status("shard:mid") == "rebuilt"
    assert workspace.status("slanc") == "rebuilt"
    for other in ("io_model", "shard:left", "shard:right", "sampler_model"):
        assert workspace.status(other) == "missing", other
    # Built into the cache; nothing is published until the whole stack is (`doit build`).
    key = workspace.state("shard:mid")["key"]
    assert (workspace.root / "cache" / "actions" / key[:2] / key / "out" / "decoder_shard_mid.mlpackage").is_dir()
    assert not workspace.out_dir.exists()
    workspace.doit("build", SEQ_LEN=SEQ_A)
    assert workspace.status("shard:mid") == "restored" and workspace.status("shard:left") == "rebuilt"
    assert (workspace.out_dir / "decoder_shard_mid.mlpackage" / "Manifest.json").is_file()


@pytest.mark.parametrize("variables,needle", [
    ({"SHARDS": "left:0-1,right:3-3"}, "gap"),
    ({"SHARDS": "left:0-2,right:2-3"}, "overlap"),
    ({"SHARDS": "left:0-1,right:2-9"}, "reaches layer 9"),
    ({"SEQ_LEN": "4k"}, "SEQ_LEN"),
    ({"SEQ_LEN": "100000"}, "SEQ_LEN"),
])
def test_invalid_input_fails_in_one_line_and_touches_nothing(workspace, variables, needle):
    result = workspace.doit("build", check=False, **variables)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert not (workspace.root / "artifacts").exists() and not (workspace.root / "cache").exists()


def test_doit_list_info_and_clean(workspace):
    listing = workspace.doit("list", "--all").stdout
    for task in ("weights", "slanc", "quant", "io_model", "shard", "shard:left", "shard:mid", "shard:right",
                 "sampler", "mil", "build"):
        assert any(line.split()[0] == task for line in listing.splitlines() if line.strip()), task
    assert all(len(line.split()) > 1 for line in listing.splitlines() if line.strip())  # every task has a doc
    info = workspace.doit("info", "shard:mid", check=False).stdout  # exit 1 = "would run"
    assert "decoder_shard_mid" in info and "content key of shard:mid" in info
    workspace.doit("build", SEQ_LEN=SEQ_A)
    workspace.doit("clean")
    assert not list(workspace.out_dir.glob("*.mlpackage"))


def test_unknown_recipe_is_refused_in_one_line(workspace):
    result = workspace.doit("build", check=False, RECIPE="int3")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1 and "RECIPE='int3'" in lines[0], result.stderr
