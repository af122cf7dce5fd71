"""The numpy evaluator against independent numpy references, on packages saved to disk.

Every program here is built with the MIL Builder, converted and saved, then read back
from disk by PackageEvaluator: the evaluator never sees the builder objects. The
evaluator has kernels for exactly the op types the build emits (checked here against
freshly built packages of every kind); the programs below use only those.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

from qwen3build.evaluator import KERNELS, PackageEvaluator, load_function  # noqa: E402
from qwen3build.evaluator.ops import (  # noqa: E402
    EMITTED_OP_TYPES,
    ENGINE_OP_TYPES,
    chunked_elementwise,
    lut_to_dense,
    to_dtype,
)

IOS18 = ct.target.iOS18
# fp16 carries ~3 decimal digits; a chain of a dozen fp16-rounded ops stays well inside this.
FP16_BLOCK_ATOL = 2e-2
FP16_BLOCK_RTOL = 2e-2
QWEN3_VOCAB = 151_936
ANSWER_INDEX = 150_000
ANSWER_INDEX_AS_INT16 = ANSWER_INDEX - 2**17  # 18928: what an int16 cast turns it into


def safe_pipeline():
    """The default pipeline minus common::add_int16_cast (it breaks vocab-sized indices)."""
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
# a small decoder block: RMSNorm, one token's GQA attention over a K/V cache, SiLU MLP


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
    @mb.program(input_specs=[mb.TensorSpec((1, HIDDEN), dtype=types.fp16),
                             mb.TensorSpec((KV_HEADS, SEQ, HEAD_DIM), dtype=types.fp16),
                             mb.TensorSpec((KV_HEADS, SEQ, HEAD_DIM), dtype=types.fp16)], opset_version=IOS18)
    def program(hidden_states, keys, values):
        normed = _mil_rms_norm(hidden_states, w["input_norm"])
        q = mb.reshape(x=mb.linear(x=normed, weight=w["q"]), shape=[KV_HEADS, GROUPS, HEAD_DIM])  # GQA groups
        scores = mb.matmul(x=q, y=keys, transpose_y=True)  # (KV, G, T)
        probs = mb.softmax(x=mb.mul(x=scores, y=np.float16(1 / math.sqrt(HEAD_DIM))), axis=-1)
        context = mb.reshape(x=mb.matmul(x=probs, y=values), shape=[1, HEADS * HEAD_DIM])  # (1, H*D)
        hidden = mb.add(x=hidden_states, y=mb.linear(x=context, weight=w["o"]))
        normed = _mil_rms_norm(hidden, w["post_norm"])
        gated = mb.mul(x=mb.silu(x=mb.linear(x=normed, weight=w["gate"])), y=mb.linear(x=normed, weight=w["up"]))
        return mb.add(x=hidden, y=mb.linear(x=gated, weight=w["down"]), name="block_out")

    return program


def _numpy_block(x, keys, values, w):
    """Plain float64 reference, written from the Qwen3 layer equations (repeat_kv form)."""
    w = {name: value.astype(np.float64) for name, value in w.items()}
    keys, values = np.repeat(keys.astype(np.float64), GROUPS, axis=0), np.repeat(values.astype(np.float64), GROUPS, 0)

    def rms_norm(h, weight):
        return h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + RMS_EPS) * weight

    x = x.astype(np.float64)  # (1, H)
    q = (rms_norm(x, w["input_norm"]) @ w["q"].T).reshape(HEADS, 1, HEAD_DIM)
    scores = q @ keys.transpose(0, 2, 1) / math.sqrt(HEAD_DIM)  # (H, 1, T)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    hidden = x + (probs @ values).reshape(1, HEADS * HEAD_DIM) @ w["o"].T
    normed = rms_norm(hidden, w["post_norm"])
    gate, up = normed @ w["gate"].T, normed @ w["up"].T
    return hidden + (gate / (1 + np.exp(-gate)) * up) @ w["down"].T


def test_attention_block_matches_numpy(tmp_path):
    weights = _block_weights()
    path = save_program(_build_block(weights), tmp_path / "block.mlpackage")
    evaluator = PackageEvaluator(path)
    assert evaluator.inputs["hidden_states"] == ((1, HIDDEN), np.dtype(np.float16))
    assert evaluator.outputs == {"block_out": ((1, HIDDEN), np.dtype(np.float16))}
    assert evaluator.states == {}

    rng = np.random.default_rng(1)
    x = fp16(rng.standard_normal((1, HIDDEN)))
    keys, values = (fp16(rng.standard_normal((KV_HEADS, SEQ, HEAD_DIM))) for _ in range(2))
    got = evaluator.predict({"hidden_states": x, "keys": keys, "values": values})["block_out"]
    assert got.dtype == np.float16 and got.shape == (1, HIDDEN)
    np.testing.assert_allclose(got.astype(np.float64), _numpy_block(x, keys, values, weights),
                               atol=FP16_BLOCK_ATOL, rtol=FP16_BLOCK_RTOL)


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
# state: ring row writes (slice_update + update per row), written in place when safe


RING_LAYERS, RING_KV_HEADS, RING_SLOTS, RING_DIM = 2, 2, 6, 4
RING_SHAPE = (2 * RING_LAYERS, RING_KV_HEADS, RING_SLOTS, RING_DIM)


def _build_ring_writes():
    """The shard's KV_WRITE=slice pattern: read once; per row, slice_update at slot S-1-p
    then update the state; each layer reads its K/V back from the last update."""
    @mb.program(input_specs=[mb.TensorSpec((2 * RING_LAYERS, RING_KV_HEADS, 1, RING_DIM), dtype=types.fp16),
                             mb.TensorSpec((1,), dtype=types.int32),
                             mb.StateTensorSpec(RING_SHAPE, dtype=types.fp16)], opset_version=IOS18)
    def program(rows, position, cache):
        slot = mb.sub(x=np.int32(RING_SLOTS - 1), y=position)
        kv = mb.read_state(input=cache)
        sums = []
        for layer in range(RING_LAYERS):
            for r in (2 * layer, 2 * layer + 1):
                begin = mb.concat(values=[np.array([r, 0], np.int32), slot, np.zeros(1, np.int32)], axis=0)
                end = mb.add(x=begin, y=np.array([1, RING_KV_HEADS, 1, RING_DIM], np.int32))
                row = mb.slice_by_index(x=rows, begin=[r, 0, 0, 0], end=[r + 1, RING_KV_HEADS, 1, RING_DIM])
                kv = mb.slice_update(x=kv, update=row, begin=begin, end=end)
                kv = mb.coreml_update_state(state=cache, value=kv)
            pair = mb.slice_by_index(x=kv, begin=[2 * layer, 0, 0, 0],
                                     end=[2 * layer + 2, RING_KV_HEADS, RING_SLOTS, RING_DIM])
            sums.append(mb.reduce_sum(x=pair, axes=[2], keep_dims=False, name=f"layer{layer}_sums"))
        return tuple(sums)

    return program


def test_ring_row_writes_in_place_match_numpy(tmp_path):
    evaluator = PackageEvaluator(save_program(_build_ring_writes(), tmp_path / "ring.mlpackage"))
    # Every row write goes into the caller's state array: no copy of the cache per step.
    assert evaluator.buffer_counts == {"in_place_writes": 2 * RING_LAYERS, "state_read_copies": 0, "update_copies": 0}
    state = evaluator.new_state()
    cache_array = state["cache"]
    expected = np.zeros(RING_SHAPE, np.float16)
    rng = np.random.default_rng(9)
    for position in range(RING_SLOTS):
        rows = fp16(rng.standard_normal((2 * RING_LAYERS, RING_KV_HEADS, 1, RING_DIM)))
        expected[:, :, RING_SLOTS - 1 - position, :] = rows[:, :, 0, :]
        out = evaluator.predict({"rows": rows, "position": np.array([position], np.int32)}, state)
        for layer in range(RING_LAYERS):
            pair = expected[2 * layer: 2 * layer + 2].astype(np.float32)
            np.testing.assert_array_equal(out[f"layer{layer}_sums"], fp16(pair.sum(axis=2)))
        np.testing.assert_array_equal(state["cache"], expected)
    assert state["cache"] is cache_array, "state must be updated in place"
    with pytest.raises(RuntimeError, match="slice_update"):  # slot -1: outside the ring, refused
        evaluator.predict({"rows": rows, "position": np.array([RING_SLOTS], np.int32)}, state)


CACHE_ROW = dict(begin=[0, 0, 5, 0], end=[1, 2, 6, 4])   # the last slot of CACHE_SHAPE
CACHE_ROW_2 = dict(begin=[0, 0, 4, 0], end=[1, 2, 5, 4])


def _state_program(body):
    @mb.program(input_specs=[mb.TensorSpec((1, 2, 1, 4), dtype=types.fp16),
                             mb.StateTensorSpec(CACHE_SHAPE, dtype=types.fp16)], opset_version=IOS18)
    def program(row, cache):
        return body(row, cache)

    return program


def _old_value_read_after_the_write(row, cache):
    old = mb.read_state(input=cache)
    written = mb.coreml_update_state(state=cache, value=mb.slice_update(x=old, update=row, **CACHE_ROW))
    return mb.reduce_sum(x=old, axes=[2], name="old_sum"), mb.reduce_sum(x=written, axes=[2], name="new_sum")


def _written_but_never_stored(row, cache):
    written = mb.slice_update(x=mb.read_state(input=cache), update=row, **CACHE_ROW)
    return mb.reduce_sum(x=written, axes=[2], name="new_sum")


def _second_read_before_the_update(row, cache):
    written = mb.slice_update(x=mb.read_state(input=cache), update=row, **CACHE_ROW)
    again = mb.read_state(input=cache)
    doubled = mb.mul(x=written, y=np.float16(2))
    mb.coreml_update_state(state=cache, value=doubled)
    return mb.reduce_sum(x=again, axes=[2], name="old_sum"), mb.reduce_sum(x=doubled, axes=[2], name="new_sum")


def _update_result_used_after_a_later_update(row, cache):
    first = mb.coreml_update_state(state=cache, value=mb.slice_update(x=mb.read_state(input=cache), update=row,
                                                                      **CACHE_ROW))
    second = mb.coreml_update_state(state=cache, value=mb.slice_update(x=first, update=mb.mul(x=row, y=np.float16(3)),
                                                                       **CACHE_ROW_2))
    return mb.reduce_sum(x=first, axes=[2], name="old_sum"), mb.reduce_sum(x=second, axes=[2], name="new_sum")


def _rows(cache, row, *writes):
    out = cache.astype(np.float32).copy()
    for slot, scale in writes:
        out[:, :, slot, :] = row[:, :, 0, :].astype(np.float32) * scale
    return out


@pytest.mark.parametrize("body, counts, expect", [
    # old value used after the write: the read copies, the write copies.
    (_old_value_read_after_the_write, (0, 1, 0),
     lambda c, r: ({"old_sum": c, "new_sum": _rows(c, r, (5, 1))}, _rows(c, r, (5, 1)))),
    # no update follows: writing the state array early would leave the row in the state.
    (_written_but_never_stored, (0, 0, 0), lambda c, r: ({"new_sum": _rows(c, r, (5, 1))}, c)),
    # a read between the write and the update must still see the old state (it copies:
    # it is used after the update; the write must not go into the state early).
    (_second_read_before_the_update, (0, 1, 0),
     lambda c, r: ({"old_sum": c, "new_sum": 2 * _rows(c, r, (5, 1))}, 2 * _rows(c, r, (5, 1)))),
    # the first update's result is used after the second: it gets a copy; the first write is in place.
    (_update_result_used_after_a_later_update, (1, 0, 1),
     lambda c, r: ({"old_sum": _rows(c, r, (5, 1)), "new_sum": _rows(c, r, (5, 1), (4, 3))},
                   _rows(c, r, (5, 1), (4, 3)))),
])
def test_state_values_stay_right_where_in_place_writes_are_unsafe(tmp_path, body, counts, expect):
    evaluator = PackageEvaluator(save_program(_state_program(body), tmp_path / "state.mlpackage"))
    assert tuple(evaluator.buffer_counts.values()) == counts
    state = evaluator.new_state()
    rng = np.random.default_rng(5)
    for _ in range(3):
        before = state["cache"].copy()
        row = fp16(rng.standard_normal((1, 2, 1, 4)))
        out = evaluator.predict({"row": row}, state)
        outputs, after = expect(before, row)
        for name, value in outputs.items():
            np.testing.assert_array_equal(out[name], fp16(value.astype(np.float32).sum(axis=2)), err_msg=name)
        np.testing.assert_array_equal(state["cache"], fp16(after))


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
# vocab-sized indices, and the add_int16_cast pitfall


WINDOW_IDS = np.array([[ANSWER_INDEX, 17, 70_000]], np.int32)


def _build_vocab_indices():
    """What the sampler does at Qwen3's vocabulary: gather logits at window ids, argmax."""
    @mb.program(input_specs=[mb.TensorSpec((1, QWEN3_VOCAB), dtype=types.fp32),
                             mb.TensorSpec(WINDOW_IDS.shape, dtype=types.int32)], opset_version=IOS18)
    def program(logits, ids):
        picked = mb.gather_along_axis(x=logits, indices=ids, axis=1, name="picked")
        argmax = mb.reduce_argmax(x=logits, axis=-1, keep_dims=False, name="argmax")
        return picked, argmax

    return program


def _vocab_logits():
    logits = np.random.default_rng(5).uniform(-4, 4, (1, QWEN3_VOCAB)).astype(np.float32)
    logits[0, ANSWER_INDEX] = 30
    logits[0, ANSWER_INDEX_AS_INT16] = -30
    logits[0, 17] = 20
    logits[0, 70_000] = 10
    return logits


def test_vocab_indices_past_16_bits(tmp_path):
    evaluator = PackageEvaluator(save_program(_build_vocab_indices(), tmp_path / "vocab.mlpackage",
                                              compute_precision=ct.precision.FLOAT32))
    out = evaluator.predict({"logits": _vocab_logits(), "ids": WINDOW_IDS})
    assert out["picked"].tolist() == [[30, 20, 10]]
    assert out["argmax"].tolist() == [ANSWER_INDEX]


def test_integer_casts_wrap_as_on_device(tmp_path):
    """What common::add_int16_cast does to vocab-sized indices (hence its removal from the
    build's pipeline, lower/mil/save.py): the evaluator shows the wrap, not a clean value."""
    @mb.program(input_specs=[mb.TensorSpec((1, 2), dtype=types.int32)], opset_version=IOS18)
    def program(ids):
        return mb.cast(x=mb.cast(x=ids, dtype="int16"), dtype="int32", name="round_trip")

    path = save_program(program, tmp_path / "wrap.mlpackage")
    out = PackageEvaluator(path).predict({"ids": np.array([[ANSWER_INDEX, 17]], np.int32)})
    assert out["round_trip"].tolist() == [[ANSWER_INDEX_AS_INT16, 17]]


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
# the data-movement and arithmetic ops the build emits, against numpy


def test_emitted_ops_against_numpy(tmp_path):
    rng = np.random.default_rng(2)
    table = fp16(rng.standard_normal((10, 4)))
    ramp = fp16(np.arange(12) - 6)

    @mb.program(
        input_specs=[
            mb.TensorSpec((1, 2), dtype=types.int32),
            mb.TensorSpec((1,), dtype=types.int32),
            mb.TensorSpec((2, 5, 3), dtype=types.fp16),
        ],
        opset_version=IOS18,
    )
    def program(token_ids, start, x):
        embedded = mb.gather(x=table, indices=token_ids, axis=0, name="embedded")  # (1, 2, 4)
        along = mb.gather_along_axis(x=x, indices=ALONG_INDICES, axis=1, name="along")
        scattered = mb.scatter_along_axis(data=x, indices=ALONG_INDICES, updates=mb.mul(x=along, y=np.float16(-1)),
                                          axis=1, mode="update", name="scattered")
        chosen = mb.select(cond=mb.greater(x=x, y=np.float16(0)), a=x, b=mb.mul(x=x, y=np.float16(0.5)), name="chosen")
        joined = mb.concat(values=[x, mb.real_div(x=x, y=np.float16(4))], axis=1, name="joined")
        stacked = mb.stack(values=[x, mb.maximum(x=x, y=np.float16(0.25))], axis=0, name="stacked")
        sliced = mb.slice_by_index(x=x, begin=[0, 1, 0], end=[2, 5, 3], stride=[1, 2, 1], name="sliced")
        window = mb.slice_by_size(x=ramp, begin=start, size=[6], name="window")  # run-time begin
        rows = mb.slice_by_size(x=table, begin=mb.concat(values=[start, np.zeros(1, np.int32)], axis=0),
                                size=[2, 4], name="rows")
        reduced = mb.reduce_max(x=x, axes=[2], keep_dims=False, name="reduced")
        clipped = mb.clip(x=mb.exp(x=x), alpha=np.float16(0.5), beta=np.float16(1.5), name="clipped")
        logged = mb.log(x=mb.mul(x=x, y=x), name="logged")
        widened = mb.cast(x=x, dtype="fp32", name="widened")
        logical = mb.logical_and(x=mb.less(x=x, y=np.float16(1)), y=mb.greater_equal(x=x, y=np.float16(-1)),
                                 name="logical")
        transposed = mb.transpose(x=x, perm=[2, 0, 1], name="transposed")
        reversed_ = mb.reverse(x=x, axes=[1], name="reversed")
        return embedded, along, scattered, chosen, joined, stacked, sliced, window, rows, reduced, clipped, \
            logged, widened, logical, transposed, reversed_

    evaluator = PackageEvaluator(save_program(program, tmp_path / "ops.mlpackage"))
    token_ids = np.array([[7, 2]], np.int32)
    x = fp16(rng.standard_normal((2, 5, 3)))
    out = evaluator.predict({"token_ids": token_ids, "start": np.array([3], np.int32), "x": x})
    x32 = x.astype(np.float32)

    np.testing.assert_array_equal(out["embedded"], table[token_ids])
    expected_along = np.take_along_axis(x, ALONG_INDICES.astype(np.intp), axis=1)
    np.testing.assert_array_equal(out["along"], expected_along)
    expected_scattered = x.copy()
    np.put_along_axis(expected_scattered, ALONG_INDICES.astype(np.intp), -expected_along, axis=1)
    np.testing.assert_array_equal(out["scattered"], expected_scattered)
    np.testing.assert_array_equal(out["chosen"], fp16(np.where(x32 > 0, x32, x32 * 0.5)))
    np.testing.assert_array_equal(out["joined"], np.concatenate([x, fp16(x32 / 4)], axis=1))
    np.testing.assert_array_equal(out["stacked"], np.stack([x, np.maximum(x, fp16(0.25))]))
    np.testing.assert_array_equal(out["sliced"], x[:, 1:5:2])
    np.testing.assert_array_equal(out["window"], ramp[3:9])
    np.testing.assert_array_equal(out["rows"], table[3:5])
    np.testing.assert_array_equal(out["reduced"], x.max(axis=2))
    np.testing.assert_array_equal(out["clipped"], fp16(np.clip(fp16(np.exp(x32)).astype(np.float32), 0.5, 1.5)))
    np.testing.assert_allclose(out["logged"], np.log(fp16(x32 * x32).astype(np.float32)), rtol=2e-3, atol=2e-3)
    assert out["widened"].dtype == np.float32 and np.array_equal(out["widened"], x32)
    np.testing.assert_array_equal(out["logical"], (x < 1) & (x >= -1))
    np.testing.assert_array_equal(out["transposed"], np.transpose(x, (2, 0, 1)))
    np.testing.assert_array_equal(out["reversed"], x[:, ::-1])
    with pytest.raises(RuntimeError, match="slice_by_size.*outside"):  # past the end: refused, not shortened
        evaluator.predict({"token_ids": token_ids, "start": np.array([9], np.int32), "x": x})


ALONG_INDICES = np.array([[[4, 0, 1]], [[2, 2, 3]]], np.int32)


# ---------------------------------------------------------------------------------------
# the kernels are exactly the op types the build emits


class _QuantizedWeights:
    """A recipe's packs without the build: LUT projections (q_proj with per-row scales, so
    the shift_scale -> lut_to_dense chain appears too) and a blockwise embedding/head."""

    def __init__(self, checkpoint, lut_bits: int, embed_bits: int):
        self.checkpoint, self.lut_bits, self.embed_bits = checkpoint, lut_bits, embed_bits

    def projection(self, layer, kind):
        from qwen3build.checkpoint.tensors import layer_tensor_name
        from qwen3build.quant.lut import fit_grouped_lut
        weight = self.checkpoint.tensor(layer_tensor_name(layer, kind))
        return fit_grouped_lut(weight, self.lut_bits, 16, per_channel_scale=kind == "q_proj")

    def table(self, head=False):
        from qwen3build.quant.blockwise import fit_blockwise
        return fit_blockwise(self.checkpoint.tensor("model.embed_tokens.weight"), bits=self.embed_bits, block_size=16)


def _built_op_types(tmp_path, checkpoint_config) -> set[str]:
    """Op types of every package kind as saved, every function: shards in both KV_WRITE modes
    (fp16 with dense tables, quantized with palettized ones; decode and prefill), io_model
    (fp16 and quantized; the one-token and the prefill functions), sampler."""
    from qwen3build.checkpoint.reader import Checkpoint, resolve_weight_files
    from qwen3build.lower.mil import programs, sampler, save
    from qwen3build.quant.provider import PackedWeights
    from qwen3build.settings.layout import parse_layout
    from qwen3build.settings.model_config import load_model_config

    config = load_model_config(checkpoint_config)
    checkpoint = Checkpoint(config, *resolve_weight_files(checkpoint_config, None, None, ""))
    spec = parse_layout("all:0-1", 2)[0]  # entry and exit: the final norm too
    scales = np.ones((config.num_hidden_layers + 1, 4), np.float32)
    seen: set[str] = set()

    def record(program, name, compute_precision=ct.precision.FLOAT16, functions=(None,)):
        path = tmp_path / f"{name}.mlpackage"
        save.save_package(save.convert(program, compute_precision=compute_precision), path)
        for function in functions:
            seen.update(op.op_type for op in load_function(path, function).function.operations)

    for label, weights, palettize in (("fp16", PackedWeights.dense(checkpoint, True), False),
                                      ("quantized", _QuantizedWeights(checkpoint, 4, 8), True)):
        for mode in ("slice", "blend"):
            record(programs.shard_program(checkpoint, weights, config, spec, scales, 8, palettize, kv_write=mode,
                                          prefill_len=4), f"shard_{label}_{mode}", functions=("decode", "prefill"))
        record(programs.io_program(weights, config, 4), f"io_{label}",
               functions=("embed", "lm_head", "embed_prefill", "lm_head_prefill"))
    record(sampler.sampler_program(config.vocab_size, 8), "sampler", compute_precision=ct.precision.FLOAT32)
    return seen


def test_kernels_are_exactly_the_op_types_the_build_emits(tmp_path, gqa_checkpoint):
    built = _built_op_types(tmp_path, gqa_checkpoint)
    assert built == EMITTED_OP_TYPES, (sorted(built - EMITTED_OP_TYPES), sorted(EMITTED_OP_TYPES - built))
    assert set(KERNELS) == EMITTED_OP_TYPES - ENGINE_OP_TYPES


# ---------------------------------------------------------------------------------------
# multi-function packages


def test_multifunction_package_selects_function(tmp_path):
    weight = fp16(np.random.default_rng(4).standard_normal((8, 4)))

    @mb.program(input_specs=[mb.TensorSpec((1, 4), dtype=types.fp16)], opset_version=IOS18)
    def decode(x):
        return mb.linear(x=x, weight=weight, name="y")

    @mb.program(input_specs=[mb.TensorSpec((3, 4), dtype=types.fp16)], opset_version=IOS18)
    def prefill(x):
        return mb.silu(x=mb.linear(x=x, weight=weight), name="y")

    descriptor = ct.utils.MultiFunctionDescriptor()
    descriptor.add_function(str(save_program(decode, tmp_path / "decode.mlpackage")), "main", "decode")
    descriptor.add_function(str(save_program(prefill, tmp_path / "prefill.mlpackage")), "main", "prefill")
    descriptor.default_function_name = "decode"
    combined = tmp_path / "combined.mlpackage"
    ct.utils.save_multifunction(descriptor, str(combined))  # works on Linux: no model load

    x_prefill = fp16(np.random.default_rng(6).standard_normal((3, 4)))
    prefill_eval = PackageEvaluator(combined, function_name="prefill")
    assert prefill_eval.inputs == {"x": ((3, 4), np.dtype(np.float16))}
    projected = fp16(x_prefill.astype(np.float32) @ weight.astype(np.float32).T).astype(np.float32)
    expected = fp16(projected / (1 + np.exp(-projected)))
    np.testing.assert_allclose(prefill_eval.predict({"x": x_prefill})["y"], expected, atol=2e-3)

    default_eval = PackageEvaluator(combined)  # the package's defaultFunctionName
    assert default_eval.function_name == "decode"
    assert default_eval.inputs == {"x": ((1, 4), np.dtype(np.float16))}
    expected = fp16(x_prefill[:1].astype(np.float32) @ weight.astype(np.float32).T)
    np.testing.assert_allclose(default_eval.predict({"x": x_prefill[:1]})["y"], expected, atol=2e-3)

    with pytest.raises(ValueError, match="no function 'verify'"):
        PackageEvaluator(combined, function_name="verify")


def test_functions_of_one_package_decode_shared_weights_once(tmp_path):
    """PackageEvaluator.functions reads a package once and decodes a weight two functions
    store once (the same blob) once: the functions' arithmetic reads the same fp32 array."""
    from qwen3build.lower.mil.quant import shared_const
    from qwen3build.evaluator.engine import ConstantPool
    rng = np.random.default_rng(8)
    weight = fp16(rng.standard_normal((16, 8)))
    indices = rng.integers(0, 4, (16, 8)).astype(types.np_uint2_dtype)
    lut = fp16(np.sort(rng.standard_normal((4, 1, 4, 1)), axis=2))
    program = ct.converters.mil.mil.Program()
    for name, rows in (("decode", 1), ("prefill", 3)):
        @mb.function(input_specs=[mb.TensorSpec((rows, 8), dtype=types.fp16)], opset_version=IOS18)
        def function(x):
            dense = shared_const(weight, "w")
            palettized = mb.constexpr_lut_to_dense(indices=shared_const(indices, "p_indices"),
                                                   lut=shared_const(lut, "p_lut"), name="p")
            return mb.add(x=mb.linear(x=x, weight=dense), y=mb.linear(x=x, weight=palettized), name="y")
        program.add_function(name, function)
    program.default_function_name, program.export_as_multifunction = "decode", True
    path = save_program(program, tmp_path / "two.mlpackage")

    pools = []
    original = ConstantPool.__init__

    def record(self):
        original(self)
        pools.append(self)
    import unittest.mock
    with unittest.mock.patch.object(ConstantPool, "__init__", record):
        both = PackageEvaluator.functions(path, ["decode", "prefill"])
    assert len(pools) == 1 and len(pools[0].widened) == 2  # w and p: one fp32 copy each, for both functions
    dense = lut_to_dense(np.asarray(indices, np.uint8), lut, None).astype(np.float32) + weight.astype(np.float32)
    x = fp16(rng.standard_normal((3, 8)))
    for name, rows in (("decode", 1), ("prefill", 3)):
        out = both[name].predict({"x": x[:rows]})["y"]
        np.testing.assert_allclose(out, x[:rows].astype(np.float32) @ dense.T, atol=FP16_BLOCK_ATOL, rtol=FP16_BLOCK_RTOL)


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


def test_no_fallback_to_coremltools_value_inference(tmp_path):
    """tile and relu6 have a value_inference in coremltools, but no kernel here: refused."""
    @mb.program(input_specs=[mb.TensorSpec((2, 5), dtype=types.fp16)], opset_version=IOS18)
    def program(x):
        return mb.relu6(x=mb.tile(x=x, reps=[1, 2]), name="y")

    assert "tile" not in KERNELS and "relu6" not in KERNELS
    with pytest.raises(NotImplementedError, match=r"fallback\.mlpackage.*'tile'.*no evaluator kernel") as info:
        PackageEvaluator(save_program(program, tmp_path / "fallback.mlpackage"))
    assert "\n" not in str(info.value)


def test_unsupported_constexpr_is_named(tmp_path):
    mask = np.zeros((4, 4), types.np_uint1_dtype)
    mask[0, :3] = 1

    @mb.program(input_specs=[mb.TensorSpec((1, 4), dtype=types.fp16)], opset_version=IOS18)
    def program(x):
        weight = mb.constexpr_sparse_to_dense(nonzero_data=fp16([1, 2, 3]), mask=mask)
        return mb.linear(x=x, weight=weight, name="y")

    with pytest.raises(NotImplementedError, match=r"sparse\.mlpackage.*'constexpr_sparse_to_dense'"):
        PackageEvaluator(save_program(program, tmp_path / "sparse.mlpackage"))
