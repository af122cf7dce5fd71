"""kill -9 at any moment, builds side by side, failed builds: the published stack is always
one whole stack, nothing is left behind, and the next build equals a clean one."""
import os
import signal
import subprocess
import sys
import time

import pytest

from qwen3build.build.faults import ENV as CRASH_ENV, POINTS
from qwen3build.stack import load_stack

from conftest import REPO, DoitWorkspace

SEQ_A, SEQ_B = 32, 40
LAYOUT = "all:0-3"  # one shard: quicker builds, the same publishing
LEFTOVER_MARKS = (".staging-", ".tmp-", ".work-", ".new-", ".old-")
# Points exercised in the default run; the slow run takes every point and timed kills.
QUICK_POINTS = ("artifact:built", "cache:sealed", "publish:assembled", "publish:between-links")
KILL_AFTER_SECONDS = (0.3, 1.0, 2.0, 3.5, 5.0, 8.0)


def tree_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(ws):
    """What a build left behind: marked temporaries, TMP_DIR entries, and anything in the
    builds' TMPDIR (coremltools converts into a temporary .mlpackage that it removes only at
    exit, which a worker never reaches: the build must put it in its own scratch folder)."""
    return [p for p in ws.root.rglob("*") if any(mark in p.name for mark in LEFTOVER_MARKS)] + \
        list((ws.root / "artifacts" / ".tmp").glob("*")) + list(ws.system_tmp.iterdir())


def published_stack(ws):
    """(seq_len, package bytes) of what a runner would load now, or None when there is none."""
    if not (ws.out_dir / "stack.json").exists():
        return None
    stack = load_stack(ws.out_dir)  # refuses a stack with a missing or changed file
    return stack.seq_len, tree_bytes(ws.out_dir)


@pytest.fixture(scope="module")
def clean_builds(tmp_path_factory, gqa_checkpoint):
    """What a clean build makes, for A and for B."""
    out = {}
    for seq in (SEQ_A, SEQ_B):
        ws = DoitWorkspace(tmp_path_factory.mktemp(f"clean{seq}"), gqa_checkpoint)
        ws.doit("build", SEQ_LEN=seq, SHARDS=LAYOUT)
        out[seq] = tree_bytes(ws.out_dir)
    return out


def start(ws, *args, env_extra=None, **variables):
    env = {k: v for k, v in os.environ.items() if k not in ("SEQ_LEN", "SHARDS", "CONFIG", "RECIPE")}
    env.update({"PYTHONPATH": str(REPO), "TMPDIR": str(ws.system_tmp), **(env_extra or {})})
    assignments = [f"{k}={v}" for k, v in {**ws.paths(), **variables}.items()]
    return subprocess.Popen([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), *args, *assignments],
                            cwd=ws.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def recover_and_compare(ws, clean_builds, before):
    """After a kill: the stack is the one before (or none yet), or the new one whole; the
    next build succeeds, leaves nothing behind and equals a clean build."""
    now = published_stack(ws)
    assert now is None or now == before or now == (SEQ_B, clean_builds[SEQ_B]), "a kill left a mixed stack"
    ws.doit("build", SEQ_LEN=SEQ_B, SHARDS=LAYOUT)
    assert not leftovers(ws), leftovers(ws)
    assert tree_bytes(ws.out_dir) == clean_builds[SEQ_B]


def killed_at_point(tmp_path, gqa_checkpoint, clean_builds, point, with_previous_stack):
    ws = DoitWorkspace(tmp_path, gqa_checkpoint)
    if with_previous_stack:
        ws.doit("build", SEQ_LEN=SEQ_A, SHARDS=LAYOUT)
    before = published_stack(ws)
    process = start(ws, "build", env_extra={CRASH_ENV: point}, SEQ_LEN=SEQ_B, SHARDS=LAYOUT)
    process.communicate(timeout=600)
    assert process.returncode == -signal.SIGKILL, f"{point}: the build was not killed there"
    recover_and_compare(ws, clean_builds, before)


@pytest.mark.parametrize("point", QUICK_POINTS)
def test_kill_9_at_a_crash_point(tmp_path, gqa_checkpoint, clean_builds, point):
    killed_at_point(tmp_path, gqa_checkpoint, clean_builds, point, with_previous_stack=True)


@pytest.mark.slow
@pytest.mark.parametrize("with_previous_stack", [True, False])
@pytest.mark.parametrize("point", POINTS)
def test_kill_9_at_every_crash_point(tmp_path, gqa_checkpoint, clean_builds, point, with_previous_stack):
    if point == "weights:hashed" and with_previous_stack:
        pytest.skip("the same checkpoint built before: its weights are not hashed again, the point is not reached")
    killed_at_point(tmp_path, gqa_checkpoint, clean_builds, point, with_previous_stack)


@pytest.mark.slow
@pytest.mark.parametrize("seconds", KILL_AFTER_SECONDS)
def test_kill_9_after_some_seconds(tmp_path, gqa_checkpoint, clean_builds, seconds):
    ws = DoitWorkspace(tmp_path, gqa_checkpoint)
    ws.doit("build", SEQ_LEN=SEQ_A, SHARDS=LAYOUT)
    before = published_stack(ws)
    process = start(ws, "build", SEQ_LEN=SEQ_B, SHARDS=LAYOUT)
    time.sleep(seconds)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    recover_and_compare(ws, clean_builds, before)


def test_two_builds_side_by_side_serialize_and_leave_one_whole_stack(tmp_path, gqa_checkpoint, clean_builds):
    ws = DoitWorkspace(tmp_path, gqa_checkpoint)
    first = start(ws, "build", SEQ_LEN=SEQ_A, SHARDS=LAYOUT)
    time.sleep(1.0)  # let the first take the lock
    second = start(ws, "build", SEQ_LEN=SEQ_B, SHARDS=LAYOUT)
    out1, err1 = first.communicate(timeout=600)
    out2, err2 = second.communicate(timeout=600)
    assert first.returncode == 0 and second.returncode == 0, err1 + err2
    assert f"pid {first.pid}" in err2 and "waiting" in err2
    seq_len, files = published_stack(ws)
    assert seq_len == SEQ_B and files == clean_builds[SEQ_B]
    assert not leftovers(ws)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "qwen3build.cli", "run", "--models-dir", str(ws.out_dir),
                          "--tokenizer", str(REPO / "assets/qwen3-tiny/tokenizer.json"), "--prompt", "x",
                          "--no-chat-template", "--max-new-tokens", "2", "--backend", "evaluator"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode in (0, 2), run.stderr  # 2 only if the tiny vocab refuses that tokenizer's ids
    assert "Traceback" not in run.stderr


def test_a_second_build_refuses_in_one_line_when_asked_not_to_wait(workspace):
    from qwen3build.build import lock
    tree_lock = workspace.root / "artifacts" / ".lock"
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; sys.path.insert(0, sys.argv[2]); "
                               "from pathlib import Path; from qwen3build.build import lock; "
                               "lock.acquire(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)",
                               str(tree_lock), str(REPO)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = workspace.doit("build", check=False, env_extra={lock.WAIT_ENV: "0"})
        lines = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("qwen3build:")]
        assert result.returncode != 0 and len(lines) == 1 and f"pid {holder.pid}" in lines[0], result.stderr
    finally:
        holder.kill()
        holder.wait()


def test_a_failing_build_leaves_the_published_stack_as_it_was(tmp_path, gqa_checkpoint):
    """A checkpoint whose final norm holds a NaN fails late (only the exit shard reads it,
    after every other package is built): the stack published before is untouched."""
    import shutil
    from safetensors.torch import load_file, save_file
    ckpt = tmp_path / "ckpt"
    shutil.copytree(gqa_checkpoint.parent, ckpt)
    ws = DoitWorkspace(tmp_path / "tree", ckpt / "config.json")
    ws.doit("build", SEQ_LEN=SEQ_A)
    before = published_stack(ws)
    tensors = load_file(str(ckpt / "model.safetensors"))
    name = "model.norm.weight"
    tensors[name][0] = float("nan")
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    result = ws.doit("build", SEQ_LEN=SEQ_A, check=False)
    assert result.returncode != 0
    lines = [line for line in result.stdout.splitlines() if line.startswith("qwen3build:")]
    assert len(lines) == 1 and name in lines[0], result.stdout + result.stderr
    assert published_stack(ws) == before
    assert not leftovers(ws)
