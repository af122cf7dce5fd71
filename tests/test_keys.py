"""Keys are complete by construction: every module whose code runs while an artifact is
built is in that artifact's key, nothing else is, and tool versions and settings move
exactly the keys they should."""
import json
import subprocess
import sys
import textwrap


from qwen3build.build import keys
from qwen3build.build.keys import code_digest, module_closure, module_digest

from conftest import REPO, DoitWorkspace, make_checkpoint

ARTIFACTS = "qwen3build.build.artifacts"
KINDS = ("slanc", "quant", "shard", "io_model", "sampler")


def closure(kind):
    return set(module_closure(f"{ARTIFACTS}.{kind}"))


def test_closures_hold_what_makes_the_bytes_and_nothing_of_the_build_machinery():
    assert "qwen3build.graph.decoder" in closure("shard")
    assert "qwen3build.lower.mil.programs" in closure("shard") and "qwen3build.lower.mil.save" in closure("io_model")
    assert "qwen3build.quant.lut" in closure("quant")
    for kind in KINDS:
        assert f"{ARTIFACTS}.{kind}" in closure(kind)  # the build body itself
        for machinery in ("qwen3build.build.plan", "qwen3build.build.declare", "qwen3build.build.actions",
                          "qwen3build.build.cache", "qwen3build.settings.settings", "qwen3build.settings.defaults",
                          "qwen3build.verify.ladder", "qwen3build.runtime.backends"):
            assert machinery not in closure(kind), (kind, machinery)
    # A graph edit does not touch the quantization packs or the SLaNC scales.
    assert "qwen3build.graph.decoder" not in closure("quant") | closure("slanc")
    assert not any(m.startswith("qwen3build.lower") for m in closure("quant") | closure("slanc"))


def test_editing_a_module_moves_exactly_the_keys_whose_code_runs_it(monkeypatch):
    all_modules = sorted({m for kind in KINDS for m in closure(kind)})
    baseline = {kind: code_digest(f"{ARTIFACTS}.{kind}") for kind in KINDS}
    real = keys.module_digest
    for edited in all_modules:
        code_digest.cache_clear()
        monkeypatch.setattr(keys, "module_digest", lambda m, e=edited: real(m) + ("-edited" if m == e else ""))
        moved = {kind for kind in KINDS if code_digest(f"{ARTIFACTS}.{kind}") != baseline[kind]}
        assert moved == {kind for kind in KINDS if edited in closure(kind)}, edited
    code_digest.cache_clear()


def test_comments_and_docstrings_are_not_code(tmp_path, monkeypatch):
    source = textwrap.dedent('''
        """Module doc."""
        def f(x):
            """Function doc."""
            return x + 1  # a comment
    ''')
    package = tmp_path / "qwen3build"
    package.mkdir()
    (package / "m.py").write_text(source)
    monkeypatch.setattr(keys, "PACKAGE_DIR", package)
    before = module_digest("qwen3build.m")
    (package / "m.py").write_text(source.replace("Function doc.", "Other words.").replace("a comment", "other"))
    assert module_digest("qwen3build.m") == before
    (package / "m.py").write_text(source.replace("x + 1", "x + 2"))
    assert module_digest("qwen3build.m") != before


# The modules whose code runs while each artifact's build body runs, traced in a fresh
# process (sys.setprofile sees every Python function call): they must all be in the key.
TRACE = textwrap.dedent('''
    import json, sys
    from qwen3build.build.actions import Builder
    from qwen3build.build.plan import make_plan
    settings = json.loads(sys.argv[1])
    builder = Builder(make_plan(settings, environ={}))
    builder.weights()
    ran, real = {}, Builder.run_body

    def traced(module, inputs, outputs):
        seen = set()
        def profile(frame, event, arg):
            if event == "call" and frame.f_code is not real.__code__:  # run_body itself only imports
                seen.add(frame.f_code.co_filename)
        sys.setprofile(profile)
        try:
            return real(module, inputs, outputs)
        finally:
            sys.setprofile(None)
            ran[inputs.artifact] = sorted(seen)

    builder.run_body = traced
    builder.publish()
    print(json.dumps(ran))
''')


def test_every_module_that_runs_during_a_build_is_in_the_key(tmp_path):
    config = make_checkpoint(tmp_path / "ckpt", "q128")
    ws = DoitWorkspace(tmp_path / "tree", config)
    recipes = tmp_path / "recipes.toml"
    recipes.write_text('[recipes.r]\nprojections = { q_proj = 4, v_proj = 6 }\nembed_bits = 8\n')
    settings = {**ws.paths(), "RECIPE": "r", "RECIPE_FILE": str(recipes)}
    result = subprocess.run([sys.executable, "-c", TRACE, json.dumps(settings)], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    ran = json.loads(result.stdout.strip().splitlines()[-1])
    package_dir = str(keys.PACKAGE_DIR) + "/"
    for artifact, files in ran.items():
        kind = {"quant": "quant", "shard": "shard", "io_model": "io_model", "sampler_model": "sampler",
                "slanc": "slanc"}[artifact.split(":")[0]]
        modules = {"qwen3build." + f[len(package_dir):-3].replace("/", ".").removesuffix(".__init__")
                   for f in files if f.startswith(package_dir) and f.endswith(".py")}
        missing = modules - closure(kind) - set(module_closure("qwen3build.build.inputs"))
        assert not missing, f"{artifact}: code ran from {sorted(missing)} but is not in its key"
        assert f"{ARTIFACTS}.{kind}" in modules


def test_a_tool_version_moves_the_keys_of_the_artifacts_it_shapes(monkeypatch, built_stack):
    from qwen3build.build import declared
    from qwen3build.build.actions import Builder
    from qwen3build.build.plan import make_plan
    plan = make_plan(built_stack.paths(), environ={})

    def key(builder, artifact):
        try:
            return builder.declarations.declare(artifact).key
        except LookupError:  # an upstream key moved and is not built: this one cannot be declared yet
            return "upstream moved"

    def keys_now():
        builder = Builder(plan)
        return {a: key(builder, a) for a in plan.artifact_ids()}

    before = keys_now()
    real = keys.tool_versions
    packages = {"io_model", "sampler_model", "shard:left", "shard:mid", "shard:right"}
    for tool, shaped in (("coremltools", packages), ("protobuf", packages), ("numpy", set(before)),
                         ("torch", set())):
        monkeypatch.setattr(declared, "tool_versions",
                            lambda tools, t=tool: {**real(tools), **({t: "0.0-other"} if t in tools else {})})
        after = keys_now()
        assert {a for a in before if after[a] != before[a]} == shaped, tool


def test_recipe_name_is_no_part_of_any_bytes_and_metadata_follows_the_bits(tmp_path):
    """default -> lut8 -> default: the io_model (same embedding bits) keeps its key and
    bytes; shards carry the bits they were built with, never a recipe name."""
    from qwen3build.evaluator.loader import read_spec
    ws = DoitWorkspace(tmp_path, make_checkpoint(tmp_path / "ckpt", "q128"))

    def metadata(package):
        return dict(read_spec(ws.out_dir / package).description.metadata.userDefined)

    ws.doit("build", RECIPE="default")
    io_default, left_default = metadata("io_model.mlpackage"), metadata("decoder_shard_left.mlpackage")
    assert "lut8" in left_default["qwen3build.quantization"]
    ws.doit("build", RECIPE="lut8")
    assert ws.status("io_model") == "up to date" and ws.status("shard:mid") == "rebuilt"
    assert metadata("io_model.mlpackage") == io_default
    mid = metadata("decoder_shard_mid.mlpackage")["qwen3build.quantization"]
    assert mid.startswith("lut8:") and "lut6" not in mid
    assert json.loads((ws.out_dir / "stack.json").read_text())["recipe"] == "lut8"
    ws.doit("build", RECIPE="default")
    assert metadata("decoder_shard_left.mlpackage") == left_default
    assert "lut6" in metadata("decoder_shard_mid.mlpackage")["qwen3build.quantization"]
    for package in ("io_model.mlpackage", "decoder_shard_left.mlpackage"):
        assert not any("recipe" in k for k in metadata(package)), package
