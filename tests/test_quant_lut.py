"""Grouped LUT palettization: exact k-means, parity with coremltools, errors, pack files."""

import itertools

import numpy as np
import pytest

from qwen3build.quant.lut import ALLOWED_BITS, LutPack, fit_grouped_lut, optimal_partition
from qwen3build.quant.packfile import load_pack, save_pack

BRUTE_FORCE_CASES = 200
# Our SSE may exceed the brute-force optimum only by float64 round-off.
OPTIMALITY_RTOL = 1e-9
OPTIMALITY_ATOL = 1e-12
# Batches checked against the simple O(k m^2) dynamic program, per bit width.
SIMPLE_DP_CASES = 6
SIMPLE_DP_GROUPS = 3
# A palettized matrix's SSE may exceed the clusters' optimum by the fp16 rounding of the LUT.
FP16_LUT_RTOL = 1e-3
# MSE vs coremltools' exact kmeans1d: equal optimum, up to fp16 LUT rounding ties.
COREMLTOOLS_MSE_RTOL = 1e-6
MEDIUM_SHAPE = (256, 512)


def bf16_like(shape, std=0.02, seed=0):
    """Random normal weights rounded through bf16, like a real checkpoint."""
    weight = np.random.default_rng(seed).normal(0, std, shape).astype(np.float32)
    bits = weight.view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # round to nearest even
    return rounded.astype(np.uint32).view(np.float32)


def partition_sse(values, weights, bounds):
    total = 0.0
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        w, v = weights[lo:hi], values[lo:hi]
        if w.sum() > 0:
            total += (w * (v - (w * v).sum() / w.sum()) ** 2).sum()
    return total


def brute_force_sse(values, weights, k):
    n = len(values)
    return min(
        partition_sse(values, weights, (0, *cuts, n))
        for cuts in itertools.combinations(range(1, n), k - 1)
    )


def test_optimal_partition_matches_brute_force():
    rng = np.random.default_rng(1)
    for case in range(BRUTE_FORCE_CASES):
        n = int(rng.integers(2, 10))
        k = int(rng.integers(1, n + 1))
        if case % 3 == 0:  # many ties
            values = np.sort(rng.integers(0, 4, n).astype(np.float64))
        else:
            values = np.sort(rng.normal(size=n))
        weights = rng.integers(0, 4, n).astype(np.float64) if case % 2 else rng.random(n)
        batch = 3  # identical rows: the batched code paths must agree
        bounds = optimal_partition(np.tile(values, (batch, 1)), np.tile(weights, (batch, 1)), k)
        reference = brute_force_sse(values, weights, k)
        for row in range(batch):
            got = partition_sse(values, weights, bounds[row])
            assert got <= reference + OPTIMALITY_RTOL * (1 + reference), (case, values, weights, k)


def simple_dp_sse(values, weights, k):
    """Optimal weighted k-means SSE by the plain O(k m^2) dynamic program (no pruning, no
    monotonicity), independent of the library's; k is capped at the number of points."""
    n = len(values)
    k = min(k, n)
    pw = np.concatenate([[0.0], np.cumsum(weights)])
    p1 = np.concatenate([[0.0], np.cumsum(weights * values)])
    p2 = np.concatenate([[0.0], np.cumsum(weights * values * values)])

    def cost(i, j):  # points i..j-1, vectorized over i
        w = pw[j] - pw[i]
        s = p1[j] - p1[i]
        return np.where(w > 0, p2[j] - p2[i] - s * s / np.where(w > 0, w, 1), 0.0)

    best = cost(np.zeros(n + 1, int), np.arange(n + 1))  # one cluster on each prefix
    for clusters in range(2, k + 1):
        nxt = np.full(n + 1, np.inf)
        for j in range(clusters, n + 1):
            i = np.arange(clusters - 1, j)
            nxt[j] = np.min(best[i] + cost(i, j))
        best = nxt
    return best[n]


def _simple_dp_batch(rng, bits, case):
    """A batch of SIMPLE_DP_GROUPS sorted point lists: ties, weighted or not, zero weights,
    fewer points than 2**bits, and a long one (long windows take the bounded search)."""
    k = 1 << bits
    rows = []
    for group in range(SIMPLE_DP_GROUPS):
        kind = (case + group) % 4
        n = int(rng.integers(max(2, k // 2), 3 * k + 40))
        if bits <= 3 and case == 0 and group == 0:
            n = 1500
        if kind == 0:  # many ties in value
            values = np.sort(rng.integers(-6, 7, n).astype(np.float64) / 8)
        else:
            values = np.sort(rng.normal(0, 0.02, n))
        if kind == 1:  # unweighted
            weights = np.ones(n)
        elif kind == 2:  # integer counts, some zero
            weights = rng.integers(0, 5, n).astype(np.float64)
            weights[rng.integers(0, n)] = 1.0
        else:  # real weights with ties
            weights = np.round(rng.random(n) * 4, 1) + 0.1
        rows.append((values, weights))
    return k, rows


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_optimal_partition_matches_simple_dp(bits):
    rng = np.random.default_rng(bits)
    for case in range(SIMPLE_DP_CASES):
        k, rows = _simple_dp_batch(rng, bits, case)
        width = max(len(values) for values, _ in rows)
        # Pad like _fit_chunk does: the last value repeated with zero weight.
        values = np.stack([np.pad(v, (0, width - len(v)), mode="edge") for v, _ in rows])
        weights = np.stack([np.pad(w, (0, width - len(w))) for _, w in rows])
        clusters = min(k, width)
        bounds = optimal_partition(values, weights, clusters)
        assert np.all(np.diff(bounds, axis=1) >= 0) and np.all(bounds[:, -1] == width)
        again = optimal_partition(values.copy(), weights.copy(), clusters)
        np.testing.assert_array_equal(bounds, again)  # deterministic
        for row, (v, w) in enumerate(rows):
            reference = simple_dp_sse(v, w, clusters)
            got = partition_sse(values[row], weights[row], bounds[row])
            assert got <= reference * (1 + OPTIMALITY_RTOL) + OPTIMALITY_ATOL, (
                bits, case, row, got, reference
            )


@pytest.mark.parametrize("bits", [2, 4])
def test_fit_with_fewer_distinct_values_than_entries_is_optimal(bits):
    rng = np.random.default_rng(11)
    palette = np.array([-0.25, -0.0625, 0.0, 0.125, 0.5, 1.0], np.float32)
    weight = palette[rng.integers(0, palette.size, (256, 24))]
    weight[128:] = palette[rng.integers(0, 2, (128, 24))]  # second group: two values only
    pack = fit_grouped_lut(weight, bits)
    dense = pack.dequantize()
    for group in range(2):
        rows = weight[128 * group : 128 * (group + 1)].astype(np.float64).ravel()
        values, counts = np.unique(rows, return_counts=True)
        best = simple_dp_sse(values, counts.astype(np.float64), 1 << bits)
        got = ((dense[128 * group : 128 * (group + 1)].ravel() - rows) ** 2).sum()
        assert got <= best * (1 + FP16_LUT_RTOL) + OPTIMALITY_ATOL


def test_fit_is_optimal_on_tiny_matrix():
    weight = bf16_like((4, 3), std=1.0, seed=3)
    pack = fit_grouped_lut(weight, bits=2, group_size=2)
    for group in range(2):
        rows = weight[2 * group : 2 * group + 2].astype(np.float16).astype(np.float64).ravel()
        values, counts = np.unique(rows, return_counts=True)
        best = brute_force_sse(values, counts.astype(np.float64), min(4, values.size))
        got = ((pack.dequantize()[2 * group : 2 * group + 2].ravel() - rows) ** 2).sum()
        assert got <= best * (1 + 1e-3) + 1e-12  # fp16 LUT rounding only


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_mse_not_worse_than_coremltools(bits):
    palettize = pytest.importorskip("coremltools.optimize.coreml._quantization_passes")
    weight = bf16_like(MEDIUM_SHAPE)
    ours = fit_grouped_lut(weight, bits, group_size=128)
    params = palettize.palettize_weights.grouped_channelwise_compress(
        weight.astype(np.float16), "KMEANS", bits, 0, 128
    )
    theirs = palettize.palettize_weights.decompress(params).astype(np.float32)
    mse_ours = np.mean((ours.dequantize() - weight) ** 2)
    mse_theirs = np.mean((theirs - weight) ** 2)
    assert mse_ours <= mse_theirs * (1 + COREMLTOOLS_MSE_RTOL), (mse_ours, mse_theirs)


def test_pack_layout_and_dequantize():
    weight = bf16_like((256, 64))
    pack = fit_grouped_lut(weight, bits=3, group_size=128)
    assert pack.indices.dtype == np.uint8 and pack.indices.shape == (256, 64)
    assert pack.lut.dtype == np.float16 and pack.lut.shape == (2, 8)
    assert pack.row_scale is None and int(pack.indices.max()) < 8
    assert np.all(np.diff(pack.lut.astype(np.float32), axis=1) >= 0)
    expected = np.stack([pack.lut[r // 128, pack.indices[r]] for r in range(256)])
    np.testing.assert_array_equal(pack.dequantize(), expected.astype(np.float32))


def test_few_distinct_values_are_exact():
    rng = np.random.default_rng(5)
    palette = np.array([-0.5, -0.125, 0.0, 0.25, 1.0], np.float32)
    weight = palette[rng.integers(0, 5, (128, 40))]
    pack = fit_grouped_lut(weight, bits=3)
    np.testing.assert_array_equal(pack.dequantize(), weight)


def test_per_channel_scale_handles_row_magnitudes():
    weight = bf16_like((128, 256))
    weight[:8] *= 50  # a few loud rows share the codebook with quiet ones
    plain = fit_grouped_lut(weight, bits=4)
    scaled = fit_grouped_lut(weight, bits=4, per_channel_scale=True)
    expected_scale = np.abs(weight).max(axis=1).astype(np.float16)
    np.testing.assert_array_equal(scaled.row_scale, expected_scale)
    quiet = slice(8, None)
    err_plain = np.mean((plain.dequantize()[quiet] - weight[quiet]) ** 2)
    err_scaled = np.mean((scaled.dequantize()[quiet] - weight[quiet]) ** 2)
    assert err_scaled < err_plain  # quiet rows get their own resolution back
    lookup = scaled.lut[0, scaled.indices].astype(np.float32) * expected_scale[:, None].astype(
        np.float32
    )
    np.testing.assert_array_equal(scaled.dequantize(), lookup.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("bits", [0, 5, 7, 16])
def test_rejects_bits(bits):
    with pytest.raises(ValueError, match=r"allowed values \(1, 2, 3, 4, 6, 8\)"):
        fit_grouped_lut(np.zeros((128, 8), np.float32), bits)


def test_rejects_partial_group():
    with pytest.raises(ValueError, match=r"\[200, 8\].*group_size=128"):
        fit_grouped_lut(np.zeros((200, 8), np.float32), 4)


def test_rejects_non_finite_and_bad_rank():
    with pytest.raises(ValueError, match="2-D"):
        fit_grouped_lut(np.zeros(128, np.float32), 4)
    bad = np.zeros((128, 8), np.float32)
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        fit_grouped_lut(bad, 4)


def test_every_allowed_bit_width_round_trips(tmp_path):
    weight = bf16_like((128, 32))
    for bits in ALLOWED_BITS:
        pack = fit_grouped_lut(weight, bits)
        path = tmp_path / f"w{bits}.npz"
        save_pack(path, pack)
        loaded = load_pack(path, expect_shape=(128, 32), expect_bits=bits)
        assert isinstance(loaded, LutPack) and loaded.bits == bits
        np.testing.assert_array_equal(loaded.dequantize(), pack.dequantize())


def test_pack_file_with_row_scale_round_trips(tmp_path):
    pack = fit_grouped_lut(bf16_like((128, 16)), 4, per_channel_scale=True)
    save_pack(tmp_path / "w.npz", pack)
    loaded = load_pack(tmp_path / "w.npz", expect_shape=(128, 16))
    np.testing.assert_array_equal(loaded.row_scale, pack.row_scale)


def test_load_pack_errors_name_file_and_problem(tmp_path):
    pack = fit_grouped_lut(bf16_like((128, 16)), 4)
    path = tmp_path / "layer00_q.npz"
    save_pack(path, pack)
    with pytest.raises(ValueError, match=r"layer00_q.npz: pack is for shape \[128, 16\] but"):
        load_pack(path, expect_shape=(256, 16))
    with pytest.raises(ValueError, match=r"layer00_q.npz: pack has 4 bits but the config asks for 6"):
        load_pack(path, expect_shape=(128, 16), expect_bits=6)
    with pytest.raises(ValueError, match="no such pack file"):
        load_pack(tmp_path / "missing.npz", expect_shape=(128, 16))

    bad_index = pack.indices.copy()
    bad_index[0, 0] = 16
    np.savez(path, format=1, kind="lut", bits=4, shape=[128, 16], group_size=128,
             indices=bad_index, lut=pack.lut)
    with pytest.raises(ValueError, match=r"layer00_q.npz: index 16 out of range.*save_pack"):
        load_pack(path, expect_shape=(128, 16))
    np.savez(path, format=1, kind="lut", bits=4, shape=[128, 16], group_size=128,
             indices=pack.indices, lut=pack.lut.astype(np.float32))
    with pytest.raises(ValueError, match="layer00_q.npz: lut must be float16"):
        load_pack(path, expect_shape=(128, 16))
    np.savez(path, format=1, kind="lut", bits=4, shape=[128, 16], indices=pack.indices)
    with pytest.raises(ValueError, match=r"missing field\(s\) \['group_size', 'lut'\]"):
        load_pack(path, expect_shape=(128, 16))
    path.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz pack"):
        load_pack(path, expect_shape=(128, 16))
