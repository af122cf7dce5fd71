"""Blockwise int4/int8 embedding/head quantization: clip search, outlier rows, pack files."""

import numpy as np
import pytest

from qwen3build.quant.blockwise import (
    BlockwisePack,
    fit_blockwise,
    outlier_rows,
    qmax_for,
)
from qwen3build.quant.packfile import load_pack, save_pack

HEAD_SHAPE = (512, 256)  # a small "vocab x hidden" head
NUM_OUTLIER_ROWS = 6
OUTLIER_GAIN = 40.0
# Relative MSE of int8 / int4 blockwise on normal data: measured ~3e-5 and ~1e-2.
INT8_MAX_REL_MSE = 1e-4
INT4_MAX_REL_MSE = 2e-2


def head_with_outlier_rows(seed=0):
    """Normal rows plus a few loud rows (OUTLIER_GAIN times larger)."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 0.02, HEAD_SHAPE).astype(np.float32)
    loud = rng.choice(HEAD_SHAPE[0], NUM_OUTLIER_ROWS, replace=False)
    weight[loud] *= OUTLIER_GAIN
    return weight, np.sort(loud)


def plain_absmax_scale(weight, bits, block_size):
    blocks = weight.reshape(weight.shape[0], -1, block_size)
    return (np.abs(blocks).max(axis=2) / qmax_for(bits)).astype(np.float16)


@pytest.mark.parametrize("bits,max_rel_mse", [(8, INT8_MAX_REL_MSE), (4, INT4_MAX_REL_MSE)])
def test_quality_and_layout(bits, max_rel_mse):
    weight = np.random.default_rng(1).normal(0, 0.02, HEAD_SHAPE).astype(np.float32)
    pack = fit_blockwise(weight, bits=bits, block_size=32)
    assert pack.data.dtype == np.int8 and pack.data.shape == HEAD_SHAPE
    assert pack.scale.dtype == np.float16 and pack.scale.shape == (512, 8)
    assert np.abs(pack.data.astype(int)).max() <= qmax_for(bits)
    rel_mse = np.mean((pack.dequantize() - weight) ** 2) / np.mean(weight**2)
    assert rel_mse < max_rel_mse


def test_clip_search_never_worse_than_absmax_per_block():
    weight = np.random.default_rng(2).standard_t(3, HEAD_SHAPE).astype(np.float32) * 0.02
    searched = fit_blockwise(weight, bits=4, protect_outlier_rows=False)
    absmax_only = fit_blockwise(weight, bits=4, clip_grid=(1.0,), protect_outlier_rows=False)

    def block_sse(pack):
        err = (pack.dequantize() - weight).reshape(HEAD_SHAPE[0], -1, 32)
        return (err**2).sum(axis=2)

    assert np.all(block_sse(searched) <= block_sse(absmax_only) * (1 + 1e-6))
    assert block_sse(searched).sum() < block_sse(absmax_only).sum()  # clipping does help here
    np.testing.assert_array_equal(absmax_only.scale, plain_absmax_scale(weight, 4, 32))


def test_outlier_rows_are_detected_and_never_clipped():
    weight, loud = head_with_outlier_rows()
    np.testing.assert_array_equal(np.flatnonzero(outlier_rows(weight)), loud)
    for bits in (4, 8):
        pack = fit_blockwise(weight, bits=bits)
        expected = plain_absmax_scale(weight, bits, 32)
        np.testing.assert_array_equal(pack.scale[loud], expected[loud])
    # At int4 the same rows would have been clipped: the protection is what keeps them whole.
    unprotected = fit_blockwise(weight, bits=4, protect_outlier_rows=False)
    assert np.any(unprotected.scale[loud] < plain_absmax_scale(weight, 4, 32)[loud])


def test_grid_values_round_trip_exactly():
    rng = np.random.default_rng(3)
    scale = (2.0 ** rng.integers(-12, -4, (64, 4))).astype(np.float16)
    data = rng.integers(-7, 8, (64, 128)).astype(np.int8)
    data[:, ::32] = 7  # every block reaches absmax, so the absmax scale is the true scale
    weight = data.astype(np.float32) * np.repeat(scale.astype(np.float32), 32, axis=1)
    pack = fit_blockwise(weight, bits=4, block_size=32)
    np.testing.assert_array_equal(pack.dequantize(), weight)


def test_zero_rows_and_configurable_block():
    weight = np.random.default_rng(4).normal(0, 0.02, (64, 96)).astype(np.float32)
    weight[5] = 0
    pack = fit_blockwise(weight, bits=8, block_size=48)
    assert pack.scale.shape == (64, 2)
    assert np.all(pack.dequantize()[5] == 0)


def test_errors_name_allowed_values():
    weight = np.zeros((8, 64), np.float32)
    with pytest.raises(ValueError, match=r"allowed values \(4, 8\)"):
        fit_blockwise(weight, bits=6)
    with pytest.raises(ValueError, match=r"\[8, 64\].*block_size=48"):
        fit_blockwise(weight, bits=8, block_size=48)
    with pytest.raises(ValueError, match="clip_grid"):
        fit_blockwise(weight, bits=8, clip_grid=(1.2,))
    with pytest.raises(ValueError, match="data values outside"):
        BlockwisePack(
            data=np.full((1, 32), 8, np.int8), scale=np.ones((1, 1), np.float16), bits=4, block_size=32
        )


def test_pack_file_round_trip_and_errors(tmp_path):
    weight, _ = head_with_outlier_rows()
    pack = fit_blockwise(weight, bits=4)
    path = tmp_path / "embed_tokens.npz"
    save_pack(path, pack)
    loaded = load_pack(path, expect_shape=HEAD_SHAPE, expect_bits=4)
    assert isinstance(loaded, BlockwisePack) and loaded.block_size == 32
    np.testing.assert_array_equal(loaded.dequantize(), pack.dequantize())

    np.savez(path, format=1, kind="blockwise", bits=4, shape=list(HEAD_SHAPE), block_size=32,
             data=pack.data, scale=pack.scale[:, :4])
    with pytest.raises(ValueError, match=r"embed_tokens.npz: scale must be float16 \[512, 8\]"):
        load_pack(path, expect_shape=HEAD_SHAPE)
    np.savez(path, format=1, kind="omniquant", bits=4, shape=list(HEAD_SHAPE))
    with pytest.raises(ValueError, match=r"kind 'omniquant' is not one of"):
        load_pack(path, expect_shape=HEAD_SHAPE)
    np.savez(path, format=1, kind="blockwise", bits=6, shape=list(HEAD_SHAPE), block_size=32,
             data=pack.data, scale=pack.scale)
    with pytest.raises(ValueError, match=r"bits=6 is not one of \(4, 8\) for a blockwise pack"):
        load_pack(path, expect_shape=HEAD_SHAPE)
