"""The same inputs give byte-identical packages and MIL dumps in any process, whatever it
built before: two fresh processes build the same stack, one of them after building
another one; every published file is compared."""
import json
import subprocess
import sys
import textwrap

from conftest import REPO, DoitWorkspace

BUILD = textwrap.dedent('''
    import json, sys
    from qwen3build.build.actions import Builder
    from qwen3build.build.plan import make_plan
    for settings in json.loads(sys.argv[1]):
        builder = Builder(make_plan(settings, environ={}))
        builder.weights()
        builder.publish()
''')


def published(ws):
    """Every file of the published generation but generation.json (its stat records)."""
    generation = ws.out_dir.resolve().parent
    return {p.relative_to(generation).as_posix(): p.read_bytes() for p in sorted(generation.rglob("*"))
            if p.is_file() and p.name != "generation.json"}


def build_in_fresh_process(*workspaces_and_settings):
    runs = [{**ws.paths(), **settings} for ws, settings in workspaces_and_settings]
    result = subprocess.run([sys.executable, "-c", BUILD, json.dumps(runs)], cwd=REPO, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr


def test_two_fresh_processes_make_identical_bytes(tmp_path, gqa_checkpoint):
    recipes = tmp_path / "recipes.toml"
    recipes.write_text('[recipes.r]\nprojections = { q_proj = 4 }\nembed_bits = 8\n')  # gqa: q has 128 rows
    quantized = {"RECIPE": "r", "RECIPE_FILE": str(recipes)}
    other = DoitWorkspace(tmp_path / "other", gqa_checkpoint)
    first = DoitWorkspace(tmp_path / "first", gqa_checkpoint)
    second = DoitWorkspace(tmp_path / "second", gqa_checkpoint)
    # The first process builds another stack before this one (op and block name counters,
    # protobuf map order, ... must not leak from one build into the next).
    build_in_fresh_process((other, {"SEQ_LEN": "48", "SHARDS": "a:0-0,b:1-3"}), (first, quantized))
    build_in_fresh_process((second, quantized))
    one, two = published(first), published(second)
    assert sorted(one) == sorted(two)
    assert any(name.endswith(".mil") for name in one) and any("weight.bin" in name for name in one)
    differing = [name for name in one if one[name] != two[name]]
    assert not differing, differing


def test_parallel_builds_with_spawned_workers_equal_a_serial_build(tmp_path):
    """`doit -n 2` with workers started by spawn (as on macOS) from a clean state."""
    from conftest import make_checkpoint
    config = make_checkpoint(tmp_path / "ckpt", "q128")
    serial = DoitWorkspace(tmp_path / "serial", config)
    parallel = DoitWorkspace(tmp_path / "parallel", config)
    serial.doit("-n", "0", "build", RECIPE="lut6-4")
    result = parallel.doit("-n", "2", "build", RECIPE="lut6-4", env_extra={"QWEN3BUILD_START_METHOD": "spawn"})
    assert "Traceback" not in result.stderr
    assert all(parallel.status(a) == "rebuilt" for a in ("quant:layer00", "shard:left", "io_model"))
    one, two = published(serial), published(parallel)
    assert sorted(one) == sorted(two)
    assert not [name for name in one if one[name] != two[name]]
