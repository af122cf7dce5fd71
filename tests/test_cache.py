"""The action cache trusts nothing: damaged or incomplete entries are found, quarantined
and rebuilt; published files are copies a write cannot reach the cache through; the
cache can be inspected, verified and kept to a size."""
import os
import stat
import subprocess
import sys

import pytest

from conftest import REPO, DoitWorkspace

SEQ_A, SEQ_B, SEQ_C = 32, 40, 48
SHARDS = ("shard:left", "shard:mid", "shard:right")


def tree_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def entry(ws, artifact):
    key = ws.state(artifact)["key"]
    return ws.root / "cache" / "actions" / key[:2] / key


def qwen3build(ws, *args):
    """The console script, with the workspace's settings (NAME=value in args win)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    given = dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("-"))
    words = [a for a in args if not ("=" in a and not a.startswith("-"))]
    settings = {**ws.paths(), **given}
    return subprocess.run([sys.executable, "-m", "qwen3build.cli", *words, *[f"{k}={v}" for k, v in settings.items()]],
                          cwd=ws.root, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def three_settings_built(tmp_path_factory, gqa_checkpoint):
    """SEQ_LEN A built first, then B and C: A's generation is no longer kept, so going back
    to A publishes from the cache. Built once; each test damages its own copy."""
    ws = DoitWorkspace(tmp_path_factory.mktemp("three"), gqa_checkpoint)
    ws.doit("build", SEQ_LEN=SEQ_A)
    published_a = tree_bytes(ws.out_dir)
    keys_a = {artifact: ws.state(artifact)["key"] for artifact in SHARDS}
    ws.doit("build", SEQ_LEN=SEQ_B)
    ws.doit("build", SEQ_LEN=SEQ_C)
    return ws, published_a, keys_a


@pytest.fixture
def three_settings(tmp_path, gqa_checkpoint, three_settings_built):
    import shutil
    built, published_a, keys_a = three_settings_built
    shutil.copytree(built.root, tmp_path / "tree", symlinks=True)
    ws = DoitWorkspace(tmp_path / "tree", gqa_checkpoint)
    entries_a = {artifact: ws.root / "cache" / "actions" / key[:2] / key for artifact, key in keys_a.items()}
    return ws, published_a, entries_a


def weight_file(entry_dir, package):
    return next((entry_dir / "out" / package).rglob("weight.bin"))


def back_to_a_rebuilds_left_only(ws, published_a, warning):
    result = ws.doit("build", SEQ_LEN=SEQ_A)
    assert ws.status("shard:left") == "rebuilt", result.stderr
    assert ws.status("shard:mid") == "restored" and ws.status("shard:right") == "restored"
    lines = [line for line in result.stderr.splitlines() if "is damaged" in line]
    assert len(lines) == 1 and warning in lines[0], result.stderr
    assert tree_bytes(ws.out_dir) == published_a  # what a fresh build of A makes
    assert list((ws.root / "cache" / "quarantine").iterdir())


def test_a_flipped_byte_is_found_quarantined_and_rebuilt(three_settings):
    ws, published_a, entries = three_settings
    path = weight_file(entries["shard:left"], "decoder_shard_left.mlpackage")
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    back_to_a_rebuilds_left_only(ws, published_a, "content differs from its recorded digest")


def test_an_entry_without_its_data_is_found_and_rebuilt(three_settings):
    import shutil
    ws, published_a, entries = three_settings
    data = entries["shard:left"] / "out" / "decoder_shard_left.mlpackage" / "Data"
    for p in data.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    shutil.rmtree(data)
    back_to_a_rebuilds_left_only(ws, published_a, "missing")


def test_an_entry_without_meta_and_with_a_truncated_file_is_not_trusted(three_settings):
    ws, published_a, entries = three_settings
    (entries["shard:left"] / "meta.json").unlink()
    path = weight_file(entries["shard:left"], "decoder_shard_left.mlpackage")
    path.chmod(0o644)
    path.write_bytes(path.read_bytes()[:100])
    back_to_a_rebuilds_left_only(ws, published_a, "no readable meta.json")


def test_cache_files_are_read_only_and_published_files_are_not_them(workspace):
    workspace.doit("build", SEQ_LEN=SEQ_A)
    cached = weight_file(entry(workspace, "shard:mid"), "decoder_shard_mid.mlpackage")
    assert not cached.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    published = next((workspace.out_dir / "decoder_shard_mid.mlpackage").rglob("weight.bin"))
    assert published.stat().st_ino != cached.stat().st_ino or not os.geteuid()  # a link only to a read-only file
    before = cached.read_bytes()
    with open(published, "r+b") as handle:  # a tool writing into the published package in place
        handle.write(b"\0" * 64)
    assert cached.read_bytes() == before
    result = workspace.doit("build", SEQ_LEN=SEQ_A)  # the published stack is noticed to be changed
    assert workspace.status("shard:mid") == "restored", result.stdout
    assert next((workspace.out_dir / "decoder_shard_mid.mlpackage").rglob("weight.bin")).read_bytes() == before


def test_cache_verify_status_and_gc(three_settings):
    ws, _published_a, entries = three_settings
    status = qwen3build(ws, "cache", "status", "SEQ_LEN=48")
    assert status.returncode == 0 and "shard" in status.stdout and "in use" in status.stdout, status.stderr
    assert qwen3build(ws, "cache", "verify").returncode == 0
    path = weight_file(entries["shard:mid"], "decoder_shard_mid.mlpackage")
    path.chmod(0o644)
    path.write_bytes(b"x" + path.read_bytes()[1:])
    verify = qwen3build(ws, "cache", "verify")
    assert verify.returncode == 1 and "1 damaged" in verify.stdout and "shard:mid" in verify.stdout
    assert not entries["shard:mid"].exists()  # quarantined
    # gc: the published generations (B and C kept) and the current settings' keys stay.
    in_use = {entry(ws, artifact) for artifact in SHARDS}
    gc = qwen3build(ws, "cache", "gc", "--max-size", "1K", "SEQ_LEN=48")
    assert gc.returncode == 0 and "removed" in gc.stdout, gc.stderr
    assert all(path.exists() for path in in_use)
    assert not entries["shard:left"].exists() and not entries["shard:right"].exists()  # A's: evicted
    assert not (ws.root / "cache" / "quarantine").exists()
    assert ws.doit("build", SEQ_LEN=SEQ_C).returncode == 0
    assert not [a for a in SHARDS if ws.status(a) == "rebuilt"]  # nothing in use was evicted


def test_cache_max_size_trims_the_cache_after_each_build(three_settings):
    """CACHE_MAX_SIZE applies gc after a build: A's entries (no kept generation and not
    these settings) go; what the published generations and these settings use stays, so
    the next build restores everything. It keys nothing."""
    ws, _published_a, entries = three_settings
    result = ws.doit("build", SEQ_LEN=SEQ_C, CACHE_MAX_SIZE="1K")
    assert "to stay within CACHE_MAX_SIZE" in result.stderr, result.stderr
    assert not entries["shard:left"].exists() and not entries["shard:right"].exists()  # A's: evicted
    in_use = {entry(ws, artifact) for artifact in SHARDS}
    assert all(path.exists() for path in in_use)
    ws.doit("build", SEQ_LEN=SEQ_C)
    assert not [a for a in SHARDS if ws.status(a) == "rebuilt"]  # nothing in use was evicted, no key moved
    bad = ws.doit("build", SEQ_LEN=SEQ_C, CACHE_MAX_SIZE="lots", check=False)
    assert bad.returncode != 0 and "CACHE_MAX_SIZE='lots' is not a size" in bad.stderr, bad.stderr


def test_cache_commands_refuse_bad_input_in_one_line(workspace):
    for args, words in ((["cache", "gc", "--max-size", "lots"], "not a size"),
                        (["cache", "status", "SEQLEN=4"], "did you mean SEQ_LEN"),
                        (["cache", "frobnicate"], "invalid choice")):
        result = qwen3build(workspace, *args)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1 and words in lines[0], (args, result.stderr)


def test_readers_never_write_into_published_packages(built_stack):
    from qwen3build.build import publish
    from qwen3build.runtime.backends import PackageBackend
    from qwen3build.stack import load_stack
    generation = built_stack.out_dir.resolve().parent
    record = publish.read_generation(generation)
    chain = PackageBackend(load_stack(built_stack.out_dir), "evaluator")  # what run and verify open
    chain.forward(1, 0)
    assert publish.generation_intact(generation, record)  # sizes, mtimes and inodes as published
