"""Quantized builds: selective requantization, no dense projection weights in the
packages, parity of the saved bytes with the reference, external packs, palettized tables."""
import json

import numpy as np
import pytest

from qwen3build.evaluator import PackageEvaluator, load_function
from qwen3build.build.plan import make_plan
from qwen3build.quant.lut import fit_grouped_lut
from qwen3build.quant.packfile import save_pack
from qwen3build.runtime.backends import PackageBackend, reference_from_stack
from qwen3build.stack import load_stack
from qwen3build.checkpoint.tensors import layer_tensor_name
from qwen3build.settings.model_config import PROJECTIONS

from conftest import DoitWorkspace, make_checkpoint

RECIPES = """
[recipes.r4]
projections = { q_proj = 4, k_proj = 4, v_proj = 4, o_proj = 4, gate_proj = 4, up_proj = 4, down_proj = 4 }
embed_bits = 8

[recipes.r4_e4]
projections = { q_proj = 4, k_proj = 4, v_proj = 4, o_proj = 4, gate_proj = 4, up_proj = 4, down_proj = 4 }
embed_bits = 4

[recipes.r4_last8]
projections = { q_proj = 4, k_proj = 4, v_proj = 4, o_proj = 4, gate_proj = 4, up_proj = 4, down_proj = 4 }
layer_bits = { "-1" = 8 }
embed_bits = 8
"""
# 4-bit LUT weights on a random checkpoint: the packages must still track the reference
# (same packed values, fp16 compute) closely; quantization error itself is verify's job.
QUANT_PACKAGE_MAX_REL_LOGIT_ERROR = 2e-2
LAYERS = ["quant:layer00", "quant:layer01", "quant:layer02", "quant:layer03"]


@pytest.fixture(scope="module")
def quant_ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    (root / "recipes.toml").write_text(RECIPES)
    ws = DoitWorkspace(root, make_checkpoint(root / "ckpt", "q128"))
    ws.recipe_vars = {"RECIPE_FILE": str(root / "recipes.toml")}
    ws.doit("build", RECIPE="r4", **ws.recipe_vars)
    return ws


@pytest.fixture(scope="module")
def quant_blend_ws(tmp_path_factory):
    """The same quantized build with KV_WRITE=blend (q128: head_dim 64 != hidden 128 / 4 heads)."""
    root = tmp_path_factory.mktemp("quant_blend")
    (root / "recipes.toml").write_text(RECIPES)
    ws = DoitWorkspace(root, make_checkpoint(root / "ckpt", "q128"))
    ws.doit("build", RECIPE="r4", KV_WRITE="blend", RECIPE_FILE=str(root / "recipes.toml"))
    return ws


def test_recipe_change_requantizes_only_the_touched_layer_and_shard(quant_ws):
    ws = quant_ws
    assert all(ws.status(i) == "rebuilt" for i in LAYERS + ["quant:embed"])
    ws.doit("build", RECIPE="r4_last8", **ws.recipe_vars)
    assert {i: ws.status(i) for i in LAYERS + ["quant:embed"]} == {
        "quant:layer00": "up to date", "quant:layer01": "up to date", "quant:layer02": "up to date",
        "quant:layer03": "rebuilt", "quant:embed": "up to date"}
    assert {i: ws.status(i) for i in ("shard:left", "shard:mid", "shard:right", "io_model")} == {
        "shard:left": "up to date", "shard:mid": "up to date", "shard:right": "rebuilt", "io_model": "up to date"}
    ws.doit("build", RECIPE="r4_last8", SHARDS="left:0-0,mid:1-2,right:3-3", **ws.recipe_vars)
    assert all(ws.status(i) == "up to date" for i in LAYERS), "a layout change must not requantize"
    ws.doit("build", RECIPE="r4", **ws.recipe_vars)  # back: a restore
    assert ws.status("quant:layer03") == "restored" and ws.status("shard:right") == "restored"


def test_quantized_packages_hold_no_dense_projection_weights(quant_ws):
    stack = json.loads((quant_ws.out_dir / "stack.json").read_text())
    for shard in stack["shards"]:
        function = load_function(quant_ws.out_dir / shard["package"]).function
        linears = [op for op in function.operations if op.op_type == "linear"]
        assert linears
        for op in linears:
            assert op.weight.op.op_type.startswith("constexpr_"), (shard["name"], op.name, op.weight.op.op_type)
    for fn in ("embed", "lm_head"):
        types = [op.op_type for op in load_function(quant_ws.out_dir / "io_model.mlpackage", fn).function.operations]
        assert "constexpr_blockwise_shift_scale" in types


@pytest.mark.parametrize("kv_write", ["slice", "blend"])
def test_quantized_chain_matches_the_reference_on_the_same_packs(request, kv_write):
    if kv_write == "slice":
        ws = request.getfixturevalue("quant_ws")
        ws.doit("build", RECIPE="r4", **ws.recipe_vars)
    else:
        ws = request.getfixturevalue("quant_blend_ws")
    stack = load_stack(ws.out_dir)
    assert stack.info["kv_write"] == kv_write
    reference = reference_from_stack(stack)  # the same packs, fp32 compute
    chain = PackageBackend(stack, "evaluator")
    for position, token in enumerate(np.random.RandomState(0).randint(0, 512, 12)):
        logits = chain.forward(int(token), position)[0].astype(np.float32)
        expected = reference.step(int(token), position)
        assert np.abs(logits - expected).max() / np.abs(expected).max() < QUANT_PACKAGE_MAX_REL_LOGIT_ERROR


def test_external_lut_packs_are_used_and_validated(tmp_path):
    (tmp_path / "recipes.toml").write_text(RECIPES)
    ws = DoitWorkspace(tmp_path, make_checkpoint(tmp_path / "ckpt", "q128"))
    plan = make_plan({**ws.paths()}, environ={})
    lut_dir = tmp_path / "luts"
    for layer in range(4):
        (lut_dir / f"layer{layer:02d}").mkdir(parents=True)
        for kind in PROJECTIONS:
            pack = fit_grouped_lut(plan.checkpoint.tensor(layer_tensor_name(layer, kind)), 4, 128)
            save_pack(lut_dir / f"layer{layer:02d}" / f"{kind}.npz", pack)
    ws.doit("build", RECIPE="r4", LUT_DIR=str(lut_dir), RECIPE_FILE=str(tmp_path / "recipes.toml"))
    assert ws.status("shard:left") == "rebuilt"
    wrong = fit_grouped_lut(plan.checkpoint.tensor(layer_tensor_name(1, "q_proj"))[:128], 4, 128)  # wrong shape
    save_pack(lut_dir / "layer01" / "q_proj.npz", wrong)
    result = ws.doit("build", RECIPE="r4", LUT_DIR=str(lut_dir), RECIPE_FILE=str(tmp_path / "recipes.toml"), check=False)
    assert result.returncode != 0
    assert "LUT_DIR" in result.stdout + result.stderr and "shape" in result.stdout + result.stderr


# The ramps hold 2 * SEQ_LEN fp16 values; palettized to 1 bit they save ~3.75 bytes per
# slot, which pays for the constexpr op's few dozen bytes of overhead from ~32 slots on.
PALETTIZE_SEQ_LEN = 512


@pytest.mark.parametrize("kv_write, ramps", [("slice", 1), ("blend", 2)])
def test_palettized_tables_save_bytes_and_change_nothing(tmp_path, gqa_checkpoint, kv_write, ramps):
    plain = DoitWorkspace(tmp_path / "plain", gqa_checkpoint)
    plain.doit("build", SEQ_LEN=PALETTIZE_SEQ_LEN, PALETTIZE_MASKS="0", KV_WRITE=kv_write)
    palettized = DoitWorkspace(tmp_path / "pal", gqa_checkpoint)
    palettized.doit("build", SEQ_LEN=PALETTIZE_SEQ_LEN, PALETTIZE_MASKS="1", KV_WRITE=kv_write)
    for name in ("left", "mid", "right"):
        state = palettized.state(f"shard:{name}")
        assert state["table_bytes_saved"] > 0
        assert state["bytes"] < plain.state(f"shard:{name}")["bytes"]
        package = f"decoder_shard_{name}.mlpackage"
        types = [op.op_type for op in load_function(palettized.out_dir / package).function.operations]
        assert types.count("constexpr_lut_to_dense") == ramps  # the mask ramp (and blend's write ramp)
    hidden = np.random.RandomState(0).randn(1, 1, 64).astype(np.float16)
    outputs = []
    for ws in (plain, palettized):
        evaluator = PackageEvaluator(ws.out_dir / "decoder_shard_left.mlpackage")
        state = evaluator.new_state()
        for position in range(3):
            out = evaluator.predict({"hidden_states": hidden, "position": np.array([position], np.int32)}, state)
        outputs.append(out["output_hidden_states"])
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_external_embedding_packs_are_used_and_missing_ones_named(tmp_path):
    from qwen3build.quant.blockwise import fit_blockwise
    (tmp_path / "recipes.toml").write_text(RECIPES)
    ws = DoitWorkspace(tmp_path, make_checkpoint(tmp_path / "ckpt", "q128"))
    recipe = {"RECIPE": "r4_e4", "RECIPE_FILE": str(tmp_path / "recipes.toml")}
    omniq = tmp_path / "omniq"
    omniq.mkdir()
    missing = ws.doit("io_model", OMNIQ_DIR=str(omniq), check=False, **recipe)
    lines = [line for line in missing.stderr.splitlines() if line.strip()]
    assert missing.returncode != 0 and len(lines) == 1 and "embed_tokens.npz" in lines[0]
    plan = make_plan({**ws.paths()}, environ={})
    pack = fit_blockwise(plan.checkpoint.tensor("model.embed_tokens.weight"), bits=4, block_size=32)
    save_pack(omniq / "embed_tokens.npz", pack)
    ws.doit("io_model", OMNIQ_DIR=str(omniq), **recipe)
    state = ws.state("quant:embed")
    wrong_bits = ws.doit("io_model", OMNIQ_DIR=str(omniq), check=False, RECIPE="r4", RECIPE_FILE=recipe["RECIPE_FILE"])
    assert wrong_bits.returncode != 0
    assert "pack has 4 bits but the config asks for 8" in wrong_bits.stdout + wrong_bits.stderr
    assert state["status"] == "rebuilt" and state["packs"]["embed_tokens"]["bits"] == 4  # the external int4 pack, not a fit
