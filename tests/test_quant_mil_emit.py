"""MIL emission: build -> convert -> save -> load back on Linux -> constexpr values == packs."""

from pathlib import Path

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.frontend.milproto.load import load as milproto_load  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

from qwen3build.graph.tables import mask_ramp, write_ramp  # noqa: E402
from qwen3build.quant.blockwise import fit_blockwise  # noqa: E402
from qwen3build.quant.lut import fit_grouped_lut  # noqa: E402
from qwen3build.lower.mil.quant import (  # noqa: E402
    blockwise_weight,
    constexpr_value,
    lut_weight,
    palettized_table,
    table_bits,
)

OUT_FEATURES, IN_FEATURES = 256, 512
DENSE_FP16_BYTES = OUT_FEATURES * IN_FEATURES * 2
# A 4-bit weight file holds packed indices (1/4 of fp16) plus small LUTs / scales.
FOUR_BIT_MAX_FRACTION_OF_FP16 = 0.30
MASK_SIZE = 256


def weight_matrix(seed=0):
    return np.random.default_rng(seed).normal(0, 0.02, (OUT_FEATURES, IN_FEATURES)).astype(np.float32)


def save_and_load(tmp_path: Path, build_weight, input_size=IN_FEATURES):
    """Program y = x @ W^T around the emitted weight; returns (loaded program, weight.bin bytes)."""

    @mb.program(
        input_specs=[mb.TensorSpec(shape=(1, input_size), dtype=types.fp16)],
        opset_version=ct.target.iOS18,
    )
    def prog(x):
        return mb.matmul(x=x, y=build_weight(), transpose_y=True, name="y")

    model = ct.convert(
        prog,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        skip_model_load=True,
    )
    package = tmp_path / "model.mlpackage"
    model.save(str(package))
    weights_dir = package / "Data" / "com.apple.CoreML" / "weights"
    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    loaded = milproto_load(spec, spec.specificationVersion, file_weights_dir=str(weights_dir))
    weight_bytes = sum(f.stat().st_size for f in weights_dir.iterdir())
    return loaded, weight_bytes


def ops_by_name(program):
    return {op.name: op for op in program.functions["main"].operations}


def assert_no_dense_const(program, shape):
    for op in program.functions["main"].operations:
        if op.op_type == "const":
            out = op.outputs[0]
            is_dense_float = types.is_float(out.dtype) if out.shape == shape else False
            assert not is_dense_float, f"dense float const {op.name} {shape} in the saved program"


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("per_channel_scale", [False, True])
def test_lut_weight_round_trip(tmp_path, bits, per_channel_scale):
    pack = fit_grouped_lut(weight_matrix(), bits, per_channel_scale=per_channel_scale)
    loaded, weight_bytes = save_and_load(tmp_path, lambda: lut_weight(pack, "proj"))
    ops = ops_by_name(loaded)
    assert ops["proj"].op_type == "constexpr_lut_to_dense"
    assert types.builtin_to_string(ops["proj"].indices.dtype) == f"uint{bits}"
    if per_channel_scale:
        assert ops["proj"].lut.op.op_type == "constexpr_blockwise_shift_scale"
    assert_no_dense_const(loaded, (OUT_FEATURES, IN_FEATURES))
    value = constexpr_value(ops["proj"].outputs[0])
    assert value.dtype == np.float16
    np.testing.assert_array_equal(value, pack.dequantize_fp16())
    if bits == 4 and not per_channel_scale:
        assert weight_bytes <= FOUR_BIT_MAX_FRACTION_OF_FP16 * DENSE_FP16_BYTES
        assert weight_bytes >= OUT_FEATURES * IN_FEATURES // 2  # really packed, not dropped


@pytest.mark.parametrize("bits", [4, 8])
def test_blockwise_weight_round_trip(tmp_path, bits):
    pack = fit_blockwise(weight_matrix(1), bits=bits, block_size=32)
    loaded, weight_bytes = save_and_load(tmp_path, lambda: blockwise_weight(pack, "head"))
    op = ops_by_name(loaded)["head"]
    assert op.op_type == "constexpr_blockwise_shift_scale"
    assert types.builtin_to_string(op.data.dtype) == f"int{bits}"
    assert_no_dense_const(loaded, (OUT_FEATURES, IN_FEATURES))
    np.testing.assert_array_equal(constexpr_value(op.outputs[0]), pack.dequantize_fp16())
    if bits == 4:
        assert weight_bytes <= FOUR_BIT_MAX_FRACTION_OF_FP16 * DENSE_FP16_BYTES


@pytest.mark.parametrize(
    "name,table,bits",
    [
        ("causal_mask_ramp", mask_ramp(MASK_SIZE // 2), 1),   # the shards' tables: (2S,)
        ("kv_write_ramp", write_ramp(MASK_SIZE // 2), 1),
        ("three_level", np.tile(np.array([0.0, 1.0, -2.0], np.float32), (MASK_SIZE, 86))[:, :MASK_SIZE], 2),
    ],
)
def test_palettized_table_round_trip(tmp_path, name, table, bits):
    saved_holder = {}

    def build():
        var, saved = palettized_table(table, name)
        saved_holder["saved"] = saved
        return var if var.rank == 2 else mb.reshape(x=var, shape=[1, -1])  # a ramp (2S,) -> (1, 2S)

    loaded, _ = save_and_load(tmp_path, build, input_size=MASK_SIZE)
    op = ops_by_name(loaded)[name]
    assert op.op_type == "constexpr_lut_to_dense"
    assert types.builtin_to_string(op.indices.dtype) == f"uint{bits}"
    assert_no_dense_const(loaded, table.shape)
    np.testing.assert_array_equal(constexpr_value(op.outputs[0]), table.astype(np.float16))
    dense = table.size * 2
    assert saved_holder["saved"] == dense - (table.size * bits // 8 + (1 << bits) * 2)


def test_table_bits_choice_and_limit():
    assert [table_bits(n) for n in (1, 2, 3, 4, 5, 16, 17, 256)] == [1, 1, 2, 2, 4, 4, 8, 8]
    with pytest.raises(ValueError, match="at most 256 distinct values, got 257"):
        table_bits(257)
    with pytest.raises(ValueError, match="257"):
        palettized_table(np.arange(257, dtype=np.float32), "too_many")
