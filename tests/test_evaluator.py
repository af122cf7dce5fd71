"""The numpy evaluator against independent numpy references, on packages saved to disk.

Every program here is built with the MIL Builder, converted and saved, then read back
from disk by PackageEvaluator: the evaluator never sees the builder objects.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

from qwen3build.evaluator import KERNELS, PackageEvaluator  # noqa: E402
from qwen3build.evaluator.ops import chunked_elementwise, lut_to_dense, to_dtype  # noqa: E402

IOS18 = ct.target.iOS18
# fp16 carries ~3 decimal digits; a chain of a dozen fp16-rounded ops stays well inside this.
FP16_BLOCK_ATOL = 2e-2
FP16_BLOCK_RTOL = 2e-2
QWEN3_VOCAB = 151_936
ANSWER_INDEX = 150_000
ANSWER_INDEX_AS_UINT16 = ANSWER_INDEX % 2**16  # 18928: what a uint16 topk index turns it into


def safe_pipeline():
    """The default pipeline minus common::add_int16_cast (it breaks vocab-sized topk)."""
    pipeline = ct.PassPipeline.DEFAULT
    pipeline.remove_passes({"common::add_int16_cast"})
    return pipeline


def save_program(program, path, pipeline=None, compute_precision=None):
    kwargs = {} if compute_precision is None else {"compute_precision": compute_precision}
    model = ct.convert(
        program,
        convert_to="mlprogram",
        minimum_deployment_target=IOS18,
        skip_model_load=True,
        pass_pipeline=pipeline if pipeline is not None else safe_pipeline(),
        **kwargs,
    )
    model.save(str(path))
    return path


def fp16(array):
    return np.asarray(array, dtype=np.float16)


# ---------------------------------------------------------------------------------------
# a small decoder block: RMSNorm, GQA attention with softmax, SiLU MLP


HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE, SEQ = 64, 4, 2, 16, 96, 5
GROUPS = HEADS // KV_HEADS
RMS_EPS = 1e-5


def _block_weights():
    rng = np.random.default_rng(7)

    def weight(rows, cols):
        return fp16(rng.standard_normal((rows, cols)) / math.sqrt(cols))

    return {
        "input_norm": fp16(1 + 0.1 * rng.standard_normal(HIDDEN)),
        "q": weight(HEADS * HEAD_DIM, HIDDEN),
        "k": weight(KV_HEADS * HEAD_DIM, HIDDEN),
        "v": weight(KV_HEADS * HEAD_DIM, HIDDEN),
        "o": weight(HIDDEN, HEADS * HEAD_DIM),
        "post_norm": fp16(1 + 0.1 * rng.standard_normal(HIDDEN)),
        "gate": weight(INTERMEDIATE, HIDDEN),
        "up": weight(INTERMEDIATE, HIDDEN),
        "down": weight(HIDDEN, INTERMEDIATE),
    }


def _mil_rms_norm(x, weight):
    mean_square = mb.reduce_mean(x=mb.mul(x=x, y=x), axes=[-1], keep_dims=True)
    return mb.mul(x=mb.mul(x=x, y=mb.rsqrt(x=mb.add(x=mean_square, y=np.float16(RMS_EPS)))), y=weight)


def _build_block(w):
    @mb.program(input_specs=[mb.TensorSpec((1, SEQ, HIDDEN), dtype=types.fp16)], opset_version=IOS18)
    def program(hidden_states):
        normed = _mil_rms_norm(hidden_states, w["input_norm"])
        q = mb.linear(x=normed, weight=w["q"])  # (1, T, H*D)
        k = mb.linear(x=normed, weight=w["k"])  # (1, T, KV*D)
        v = mb.linear(x=normed, weight=w["v"])
        # GQA: each KV head serves GROUPS query heads; fold them into the row axis.
        q = mb.transpose(x=mb.reshape(x=q, shape=[1, SEQ, KV_HEADS, GROUPS, HEAD_DIM]), perm=[0, 2, 3, 1, 4])
        q = mb.reshape(x=q, shape=[1, KV_HEADS, GROUPS * SEQ, HEAD_DIM])  # (1, KV, G*T, D)
        k = mb.transpose(x=mb.reshape(x=k, shape=[1, SEQ, KV_HEADS, HEAD_DIM]), perm=[0, 2, 1, 3])  # (1, KV, T, D)
        v = mb.transpose(x=mb.reshape(x=v, shape=[1, SEQ, KV_HEADS, HEAD_DIM]), perm=[0, 2, 1, 3])
        scores = mb.matmul(x=q, y=k, transpose_y=True)  # (1, KV, G*T, T)
        scores = mb.mul(x=scores, y=np.float16(1 / math.sqrt(HEAD_DIM)))
        probs = mb.softmax(x=scores, axis=-1)
        context = mb.matmul(x=probs, y=v)  # (1, KV, G*T, D)
        context = mb.reshape(x=context, shape=[1, KV_HEADS, GROUPS, SEQ, HEAD_DIM])
        context = mb.reshape(x=mb.transpose(x=context, perm=[0, 3, 1, 2, 4]), shape=[1, SEQ, HEADS * HEAD_DIM])
        hidden = mb.add(x=hidden_states, y=mb.linear(x=context, weight=w["o"]))
        normed = _mil_rms_norm(hidden, w["post_norm"])
        gated = mb.mul(x=mb.silu(x=mb.linear(x=normed, weight=w["gate"])), y=mb.linear(x=normed, weight=w["up"]))
        return mb.add(x=hidden, y=mb.linear(x=gated, weight=w["down"]), name="block_out")

    return program


def _numpy_block(x, w):
    """Plain float64 reference, written from the Qwen3 layer equations."""
    w = {name: value.astype(np.float64) for name, value in w.items()}

    def rms_norm(h, weight):
        return h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + RMS_EPS) * weight

    x = x.astype(np.float64)[0]  # (T, H)
    normed = rms_norm(x, w["input_norm"])
    q = (normed @ w["q"].T).reshape(SEQ, HEADS, HEAD_DIM).transpose(1, 0, 2)  # (H, T, D)
    k = (normed @ w["k"].T).reshape(SEQ, KV_HEADS, HEAD_DIM).transpose(1, 0, 2)  # (KV, T, D)
    v = (normed @ w["v"].T).reshape(SEQ, KV_HEADS, HEAD_DIM).transpose(1, 0, 2)
    k, v = np.repeat(k, GROUPS, axis=0), np.repeat(v, GROUPS, axis=0)  # repeat_kv: (H, T, D)
    scores = q @ k.transpose(0, 2, 1) / math.sqrt(HEAD_DIM)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = (probs @ v).transpose(1, 0, 2).reshape(SEQ, HEADS * HEAD_DIM)
    hidden = x + context @ w["o"].T
    normed = rms_norm(hidden, w["post_norm"])
    gate, up = normed @ w["gate"].T, normed @ w["up"].T
    return (hidden + (gate / (1 + np.exp(-gate)) * up) @ w["down"].T)[None]


def test_attention_block_matches_numpy(tmp_path):
    weights = _block_weights()
    path = save_program(_build_block(weights), tmp_path / "block.mlpackage")
    evaluator = PackageEvaluator(path)
    assert evaluator.inputs == {"hidden_states": ((1, SEQ, HIDDEN), np.dtype(np.float16))}
    assert evaluator.outputs == {"block_out": ((1, SEQ, HIDDEN), np.dtype(np.float16))}
    assert evaluator.states == {}

    x = fp16(np.random.default_rng(1).standard_normal((1, SEQ, HIDDEN)))
    got = evaluator.predict({"hidden_states": x})["block_out"]
    assert got.dtype == np.float16 and got.shape == (1, SEQ, HIDDEN)
    np.testing.assert_allclose(got.astype(np.float64), _numpy_block(x, weights), atol=FP16_BLOCK_ATOL, rtol=FP16_BLOCK_RTOL)


# ---------------------------------------------------------------------------------------
# state: masked-blend KV write, Core ML read/update semantics


CACHE_SHAPE = (1, 2, 6, 4)  # (batch, kv heads, positions, head dim)


def _build_masked_blend():
    @mb.program(
        input_specs=[
            mb.TensorSpec((1, 2, 1, 4), dtype=types.fp16),  # new K row
            mb.TensorSpec((1, 1, 6, 1), dtype=types.fp16),  # one-hot row mask
            mb.StateTensorSpec(CACHE_SHAPE, dtype=types.fp16),
        ],
        opset_version=IOS18,
    )
    def program(new_row, row_mask, cache):
        old = mb.read_state(input=cache)
        keep = mb.sub(x=np.float16(1), y=row_mask)
        blended = mb.add(x=mb.mul(x=old, y=keep), y=mb.mul(x=new_row, y=row_mask))  # cache*(1-m) + new*m
        written = mb.coreml_update_state(state=cache, value=blended)
        # old_sum is used after the update: it must still see the value from before it.
        old_sum = mb.reduce_sum(x=old, axes=[2], keep_dims=False, name="old_sum")
        new_sum = mb.reduce_sum(x=written, axes=[2], keep_dims=False, name="new_sum")
        return old_sum, new_sum

    return program


def test_masked_blend_state_after_three_steps(tmp_path):
    evaluator = PackageEvaluator(save_program(_build_masked_blend(), tmp_path / "blend.mlpackage"))
    assert evaluator.states == {"cache": (CACHE_SHAPE, np.dtype(np.float16))}
    state = evaluator.new_state()
    assert state["cache"].dtype == np.float16 and not state["cache"].any()

    rng = np.random.default_rng(3)
    expected = np.zeros(CACHE_SHAPE)
    cache_array = state["cache"]
    for position in (5, 4, 3):  # reverse ring buffer: newest row first from the end
        new_row = fp16(rng.standard_normal((1, 2, 1, 4)))
        mask = np.zeros((1, 1, 6, 1), np.float16)
        mask[0, 0, position, 0] = 1
        previous = expected.copy()
        expected = expected * (1 - mask) + new_row * mask
        out = evaluator.predict({"new_row": new_row, "row_mask": mask}, state)
        np.testing.assert_array_equal(out["old_sum"], fp16(previous.sum(axis=2)))
        np.testing.assert_array_equal(out["new_sum"], fp16(expected.sum(axis=2)))

    assert state["cache"] is cache_array, "state must be updated in place"
    np.testing.assert_array_equal(state["cache"], fp16(expected))
    assert not state["cache"][:, :, :3].any()


def test_stateful_model_requires_state(tmp_path):
    evaluator = PackageEvaluator(save_program(_build_masked_blend(), tmp_path / "blend.mlpackage"))
    inputs = {"new_row": np.zeros((1, 2, 1, 4), np.float16), "row_mask": np.zeros((1, 1, 6, 1), np.float16)}
    with pytest.raises(ValueError, match="new_state"):
        evaluator.predict(inputs)
    with pytest.raises(ValueError, match="state 'cache'"):
        evaluator.predict(inputs, {"cache": np.zeros(CACHE_SHAPE, np.float32)})


# ---------------------------------------------------------------------------------------
# constexpr weights: 4-bit grouped LUT, int8 / int4 blockwise shift-scale, a chain


OUT_FEATURES, IN_FEATURES = 8, 16


def test_constexpr_weights_match_independent_decode(tmp_path):
    rng = np.random.default_rng(11)
    # 4-bit palettization with one 16-entry palette per group of 2 output rows.
    lut_indices = rng.integers(0, 16, (OUT_FEATURES, IN_FEATURES)).astype(types.np_uint4_dtype)
    lut = fp16(rng.standard_normal((OUT_FEATURES // 2, 1, 16, 1)))
    lut_weight = np.stack([lut[row // 2, 0, lut_indices[row], 0] for row in range(OUT_FEATURES)])

    # int8 with per-(row, 4-column block) scale and int8 offset.
    int8_data = rng.integers(-128, 128, (OUT_FEATURES, IN_FEATURES)).astype(np.int8)
    int8_scale = fp16(rng.uniform(0.001, 0.02, (OUT_FEATURES, IN_FEATURES // 4)))
    int8_offset = rng.integers(-3, 4, (OUT_FEATURES, IN_FEATURES // 4)).astype(np.int8)
    int8_weight = np.repeat(int8_scale.astype(np.float32), 4, axis=1) * (
        int8_data.astype(np.float32) - np.repeat(int8_offset.astype(np.float32), 4, axis=1)
    )

    # int4 with per-row scale, no offset.
    int4_data = rng.integers(-8, 8, (OUT_FEATURES, IN_FEATURES)).astype(types.np_int4_dtype)
    int4_scale = fp16(rng.uniform(0.01, 0.1, (OUT_FEATURES, 1)))
    int4_weight = int4_scale.astype(np.float32) * int4_data.astype(np.float32)

    # Chain: the LUT itself is int8, dequantized by a blockwise shift-scale first.
    chained_lut_int8 = rng.integers(-128, 128, (1, 1, 16, 1)).astype(np.int8)
    chained_lut_scale = fp16([[[[0.01]]]])
    chained_indices = rng.integers(0, 16, (OUT_FEATURES, IN_FEATURES)).astype(types.np_uint4_dtype)
    chained_weight = (chained_lut_int8.astype(np.float32) * np.float32(chained_lut_scale[0, 0, 0, 0]))[
        0, 0, chained_indices.astype(np.int64), 0
    ]

    @mb.program(input_specs=[mb.TensorSpec((IN_FEATURES, IN_FEATURES), dtype=types.fp16)], opset_version=IOS18)
    def program(x):
        weights = {
            "lut_out": mb.constexpr_lut_to_dense(indices=lut_indices, lut=lut),
            "int8_out": mb.constexpr_blockwise_shift_scale(data=int8_data, scale=int8_scale, offset=int8_offset),
            "int4_out": mb.constexpr_blockwise_shift_scale(data=int4_data, scale=int4_scale),
            "chained_out": mb.constexpr_lut_to_dense(
                indices=chained_indices,
                lut=mb.constexpr_blockwise_shift_scale(data=chained_lut_int8, scale=chained_lut_scale),
            ),
        }
        # linear(identity, W) = W^T exactly: the outputs are the dequantized weights.
        return tuple(mb.linear(x=x, weight=weight, name=name) for name, weight in weights.items())

    evaluator = PackageEvaluator(save_program(program, tmp_path / "constexpr.mlpackage"))
    out = evaluator.predict({"x": np.eye(IN_FEATURES, dtype=np.float16)})
    np.testing.assert_array_equal(out["lut_out"], lut_weight.T)
    np.testing.assert_array_equal(out["int8_out"], fp16(int8_weight).T)
    np.testing.assert_array_equal(out["int4_out"], fp16(int4_weight).T)
    np.testing.assert_array_equal(out["chained_out"], fp16(chained_weight).T)


def test_lut_to_dense_vector_palettes():
    """Case 2.2 of the MIL docs: 1-bit vector palettization along the last axis."""
    indices = np.array([[[0, 0], [1, 0]], [[1, 1], [0, 0]]], np.uint8)
    a, b = [1.0, 2.0, 3.0], [10.0, 20.0, 30.0]
    lut = fp16([a, b]).reshape(1, 1, 1, 2, 3)
    expected = fp16([[a + a, b + a], [b + b, a + a]])
    np.testing.assert_array_equal(lut_to_dense(indices, lut, vector_axis=2), expected)


# ---------------------------------------------------------------------------------------
# vocab-sized topk / argmax, and the add_int16_cast pitfall


def _build_vocab_argmax():
    @mb.program(input_specs=[mb.TensorSpec((1, QWEN3_VOCAB), dtype=types.fp16)], opset_version=IOS18)
    def program(logits):
        values, indices = mb.topk(x=logits, k=3, axis=-1, name="topk")
        argmax = mb.reduce_argmax(x=logits, axis=-1, keep_dims=False, name="argmax")
        return mb.identity(x=values, name="top_values"), mb.identity(x=indices, name="top_indices"), argmax

    return program


def _vocab_logits():
    logits = fp16(np.random.default_rng(5).uniform(-4, 4, (1, QWEN3_VOCAB)))
    logits[0, ANSWER_INDEX] = 30
    logits[0, 17] = 20
    logits[0, 70_000] = 10
    return logits


def test_vocab_topk_and_argmax_past_uint16(tmp_path):
    evaluator = PackageEvaluator(save_program(_build_vocab_argmax(), tmp_path / "argmax.mlpackage"))
    out = evaluator.predict({"logits": _vocab_logits()})
    assert out["top_indices"].tolist() == [[ANSWER_INDEX, 17, 70_000]]
    assert out["top_values"].tolist() == [[30, 20, 10]]
    assert out["argmax"].tolist() == [ANSWER_INDEX]


def test_default_pipeline_int16_cast_breaks_topk_and_evaluator_shows_it(tmp_path):
    path = save_program(_build_vocab_argmax(), tmp_path / "argmax_default.mlpackage", pipeline=ct.PassPipeline.DEFAULT)
    evaluator = PackageEvaluator(path)
    out = evaluator.predict({"logits": _vocab_logits()})
    # The saved program computes topk indices as uint16 and casts back: 150000 wraps.
    assert out["top_indices"][0, 0] == ANSWER_INDEX_AS_UINT16
    assert out["argmax"].tolist() == [ANSWER_INDEX]  # reduce_argmax is not touched by the pass


# ---------------------------------------------------------------------------------------
# fp16 rounding per op


def test_fp16_overflow_shows_up_as_inf(tmp_path):
    def build(dtype):
        @mb.program(input_specs=[mb.TensorSpec((1, 8), dtype=dtype)], opset_version=IOS18)
        def program(x):
            sum_of_squares = mb.reduce_sum(x=mb.mul(x=x, y=x), axes=[-1], keep_dims=True, name="sum_of_squares")
            return sum_of_squares, mb.mul(x=x, y=mb.rsqrt(x=sum_of_squares), name="normalized")

        return program

    x = np.full((1, 8), 300.0)  # 300^2 * 8 = 720000 > fp16 max 65504
    fp16_eval = PackageEvaluator(save_program(build(types.fp16), tmp_path / "fp16.mlpackage"))
    out = fp16_eval.predict({"x": fp16(x)})
    assert np.isinf(out["sum_of_squares"]).all()
    assert (out["normalized"] == 0).all()  # x * rsqrt(inf): the classic RMSNorm collapse

    fp32_eval = PackageEvaluator(
        save_program(build(types.fp32), tmp_path / "fp32.mlpackage", compute_precision=ct.precision.FLOAT32)
    )
    out = fp32_eval.predict({"x": x.astype(np.float32)})
    np.testing.assert_allclose(out["sum_of_squares"], 720000.0)
    np.testing.assert_allclose(out["normalized"], 1 / math.sqrt(8), rtol=1e-6)


def test_fp16_rounding_happens_after_every_op(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec((1, 1), dtype=types.fp16)], opset_version=IOS18)
    def program(x):
        # (x + 1) - 1 with x = 2**-12: fp16 rounds 1 + 2**-12 to 1, so the result is 0.
        return mb.sub(x=mb.add(x=x, y=np.float16(1)), y=np.float16(1), name="y")

    evaluator = PackageEvaluator(save_program(program, tmp_path / "round.mlpackage"))
    assert evaluator.predict({"x": fp16([[2**-12]])})["y"].tolist() == [[0.0]]


def test_fast_fp16_cast_is_bitwise_numpy():
    rng = np.random.default_rng(0)
    edges = [0.0, -0.0, 65504, 65519.99, 65520, -65520, 1e-8, 6e-8, 2**-24, 3e-5, np.inf, -np.inf, 1 + 2**-11]
    values = np.concatenate([rng.standard_normal(1 << 14) * 10 ** rng.uniform(-8, 6, 1 << 14), edges]).astype(np.float32)
    with np.errstate(over="ignore"):
        halves = values.astype(np.float16)
    np.testing.assert_array_equal(to_dtype(values, np.dtype(np.float16)).view(np.uint16), halves.view(np.uint16))
    np.testing.assert_array_equal(to_dtype(halves, np.dtype(np.float32)), halves.astype(np.float32))


# ---------------------------------------------------------------------------------------
# other ops the builders use: gather (batch_dims), gather_along_axis, select, cumsum, ...


ALONG_INDICES = np.array([[[4, 0, 1]], [[2, 2, 3]]], np.int32)


def test_gather_select_cumsum_and_friends(tmp_path):
    rng = np.random.default_rng(2)
    table = fp16(rng.standard_normal((10, 4)))
    batched = fp16(rng.standard_normal((2, 5, 3)))

    @mb.program(
        input_specs=[
            mb.TensorSpec((1, 2), dtype=types.int32),
            mb.TensorSpec((2, 2), dtype=types.int32),
            mb.TensorSpec((2, 5, 3), dtype=types.fp16),
        ],
        opset_version=IOS18,
    )
    def program(token_ids, batch_ids, x):
        embedded = mb.gather(x=table, indices=token_ids, axis=0, name="embedded")  # (1, 2, 4)
        per_batch = mb.gather(x=batched, indices=batch_ids, axis=1, batch_dims=1, name="per_batch")  # (2, 2, 3)
        along = mb.gather_along_axis(x=x, indices=ALONG_INDICES, axis=1, name="along")
        chosen = mb.select(cond=mb.greater(x=x, y=np.float16(0)), a=x, b=mb.fill(shape=[2, 5, 3], value=np.float16(-1)), name="chosen")
        running = mb.cumsum(x=x, axis=1, name="running")
        pieces = mb.split(x=x, split_sizes=[2, 3], axis=1)
        joined = mb.concat(values=[pieces[1], pieces[0]], axis=1, name="joined")
        sliced = mb.slice_by_index(x=x, begin=[0, 1, 0], end=[2, 5, 3], stride=[1, 2, 1], name="sliced")
        sized = mb.slice_by_size(x=x, begin=[1, 2, 0], size=[1, -1, 2], name="sized")
        tiled = mb.tile(x=mb.expand_dims(x=sized, axes=[0]), reps=[2, 1, 1, 1], name="tiled")
        squeezed = mb.squeeze(x=mb.reduce_max(x=x, axes=[2], keep_dims=True), axes=[2], name="squeezed")
        clipped = mb.clip(x=mb.square(x=x), alpha=np.float16(0.1), beta=np.float16(1.5), name="clipped")
        logical = mb.logical_and(x=mb.less(x=x, y=np.float16(1)), y=mb.equal(x=x, y=x), name="logical")
        return embedded, per_batch, along, chosen, running, joined, sliced, sized, tiled, squeezed, clipped, logical

    evaluator = PackageEvaluator(save_program(program, tmp_path / "misc.mlpackage"))
    token_ids = np.array([[7, 2]], np.int32)
    batch_ids = np.array([[4, 0], [1, 1]], np.int32)
    x = fp16(rng.standard_normal((2, 5, 3)))
    out = evaluator.predict({"token_ids": token_ids, "batch_ids": batch_ids, "x": x})

    np.testing.assert_array_equal(out["embedded"], table[token_ids])
    np.testing.assert_array_equal(out["per_batch"], np.stack([batched[b][batch_ids[b]] for b in range(2)]))
    expected_along = [[[x[b, ALONG_INDICES[b, 0, c], c] for c in range(3)]] for b in range(2)]
    np.testing.assert_array_equal(out["along"], fp16(expected_along))
    np.testing.assert_array_equal(out["chosen"], np.where(x > 0, x, fp16(-1)))
    np.testing.assert_allclose(out["running"], np.cumsum(x.astype(np.float32), axis=1), atol=5e-3)
    np.testing.assert_array_equal(out["joined"], np.concatenate([x[:, 2:], x[:, :2]], axis=1))
    np.testing.assert_array_equal(out["sliced"], x[:, 1:5:2])
    np.testing.assert_array_equal(out["sized"], x[1:2, 2:, 0:2])
    np.testing.assert_array_equal(out["tiled"], np.tile(x[None, 1:2, 2:, 0:2], (2, 1, 1, 1)))
    np.testing.assert_array_equal(out["squeezed"], x.max(axis=2))
    np.testing.assert_array_equal(out["clipped"], fp16(np.clip(x.astype(np.float32) ** 2, fp16(0.1), 1.5)))
    np.testing.assert_array_equal(out["logical"], x < 1)


# ---------------------------------------------------------------------------------------
# multi-function packages


def test_multifunction_package_selects_function(tmp_path):
    weight = fp16(np.random.default_rng(4).standard_normal((8, 4)))

    @mb.program(input_specs=[mb.TensorSpec((1, 4), dtype=types.fp16)], opset_version=IOS18)
    def decode(x):
        return mb.linear(x=x, weight=weight, name="y")

    @mb.program(input_specs=[mb.TensorSpec((3, 4), dtype=types.fp16)], opset_version=IOS18)
    def prefill(x):
        return mb.relu(x=mb.linear(x=x, weight=weight), name="y")

    descriptor = ct.utils.MultiFunctionDescriptor()
    descriptor.add_function(str(save_program(decode, tmp_path / "decode.mlpackage")), "main", "decode")
    descriptor.add_function(str(save_program(prefill, tmp_path / "prefill.mlpackage")), "main", "prefill")
    descriptor.default_function_name = "decode"
    combined = tmp_path / "combined.mlpackage"
    ct.utils.save_multifunction(descriptor, str(combined))  # works on Linux: no model load

    x_prefill = fp16(np.random.default_rng(6).standard_normal((3, 4)))
    prefill_eval = PackageEvaluator(combined, function_name="prefill")
    assert prefill_eval.inputs == {"x": ((3, 4), np.dtype(np.float16))}
    expected = fp16(np.maximum(x_prefill.astype(np.float32) @ weight.astype(np.float32).T, 0))
    np.testing.assert_allclose(prefill_eval.predict({"x": x_prefill})["y"], expected, atol=2e-3)

    default_eval = PackageEvaluator(combined)  # the package's defaultFunctionName
    assert default_eval.function_name == "decode"
    assert default_eval.inputs == {"x": ((1, 4), np.dtype(np.float16))}
    expected = fp16(x_prefill[:1].astype(np.float32) @ weight.astype(np.float32).T)
    np.testing.assert_allclose(default_eval.predict({"x": x_prefill[:1]})["y"], expected, atol=2e-3)

    with pytest.raises(ValueError, match="no function 'verify'"):
        PackageEvaluator(combined, function_name="verify")


# ---------------------------------------------------------------------------------------
# errors


@pytest.fixture
def small_package(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec((2, 3), dtype=types.fp16)], opset_version=IOS18)
    def program(x):
        return mb.silu(x=x, name="y")

    return save_program(program, tmp_path / "small.mlpackage")


def test_input_errors_are_one_line(small_package):
    evaluator = PackageEvaluator(small_package)
    for bad_inputs, message in [
        ({}, "missing input 'x'"),
        ({"x": np.zeros((3, 2))}, r"input 'x' has shape \(3, 2\), expected \(2, 3\)"),
        ({"x": np.zeros((2, 3)), "z": np.zeros(1)}, "unknown inputs"),
    ]:
        with pytest.raises(ValueError, match=message) as raised:
            evaluator.predict(bad_inputs)
        assert "\n" not in str(raised.value)
    # fp32 inputs are accepted for fp16 features and rounded, as Core ML does.
    x = np.linspace(-3, 3, 6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(evaluator.predict({"x": x})["y"], x / (1 + np.exp(-x)), atol=2e-3)


def test_unknown_op_names_op_type_and_package(small_package, monkeypatch):
    monkeypatch.delitem(KERNELS, "silu")  # silu has no coremltools value_inference either
    with pytest.raises(NotImplementedError, match=r"small\.mlpackage.*'silu'"):
        PackageEvaluator(small_package)


def test_unsupported_real_op(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec((1, 2, 4, 4), dtype=types.fp16)], opset_version=IOS18)
    def program(x):
        return mb.instance_norm(x=x, epsilon=np.float16(1e-3), name="y")

    path = save_program(program, tmp_path / "instance_norm.mlpackage")
    with pytest.raises(NotImplementedError, match=r"instance_norm\.mlpackage.*'instance_norm'"):
        PackageEvaluator(path)


def test_chunked_elementwise_is_bitwise_whole_array():
    """Big fp16 elementwise ops run in cache-sized pieces; the result must not change."""
    rng = np.random.default_rng(8)
    out_shape = (3, 1000, 130)
    cache = fp16(rng.standard_normal(out_shape))
    row_mask = fp16(rng.integers(0, 2, (1000, 1)))
    new_row = fp16(rng.standard_normal((3, 1, 130)) * 1e3)

    def blend(cache_value, mask, row):
        mask32 = mask.astype(np.float32)
        return cache_value.astype(np.float32) * (1 - mask32) + row.astype(np.float32) * mask32 * 70

    whole = to_dtype(blend(cache, row_mask, new_row), np.dtype(np.float16))
    assert np.isinf(whole).any()  # 1e3 * 70 overflows fp16 in some rows
    pieces = chunked_elementwise(blend, [cache.shape, row_mask.shape, new_row.shape], out_shape, np.dtype(np.float16))
    np.testing.assert_array_equal(pieces(cache, row_mask, new_row).view(np.uint16), whole.view(np.uint16))


def test_ops_without_kernel_fall_back_to_coremltools_value_inference(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec((2, 5), dtype=types.fp16)], opset_version=IOS18)
    def program(x):
        return mb.relu6(x=mb.reverse(x=x, axes=[1]), name="y")

    assert "reverse" not in KERNELS and "relu6" not in KERNELS
    evaluator = PackageEvaluator(save_program(program, tmp_path / "fallback.mlpackage"))
    x = fp16(np.linspace(-3, 9, 10).reshape(2, 5))
    np.testing.assert_array_equal(evaluator.predict({"x": x})["y"], np.clip(x[:, ::-1], 0, 6))
