"""GS128 grouped LUT palettization: exact weighted 1-D k-means per group of output rows.

A weight matrix W [out_features, in_features] is cut into groups of `group_size`
consecutive rows (output channels). Every group gets one codebook (LUT) of 2**bits
fp16 entries, and every weight stores the index of its entry. Optionally each row is
first divided by its own scale (row absmax, fp16) and the scale is re-applied at
dequantization ("per-group scalars" in DESIGN.md section 2).

The codebook is the optimal k-means codebook, computed exactly, not by Lloyd:

1. Values are clustered as fp16 numbers, like coremltools does (its exact path only
   runs on fp16 weights). Weights from bf16 / fp16 checkpoints are fp16-exact except
   for bf16 values below 2**-17, whose fp16 rounding error is below 4e-8.
2. An fp16 number is a 16-bit pattern, so a `np.bincount` per group over the patterns
   gives every group's distinct values with their counts in O(n), with no sort (the
   65,536 columns are then permuted into value order). A group of 128 rows of a bf16
   checkpoint holds about 3,000 distinct values for 262,144 weights.
3. 1-D k-means on sorted weighted points is a shortest k-link path problem whose cost
   matrix is Monge, so its optimum comes from a dynamic program over prefixes:
       D[l][j] = min_{i<j} D[l-1][i] + cost(i, j)
   with cost(i, j) the weighted squared error of points i..j-1 around their mean
   (O(1) from prefix sums). The argmin opt[l][j] is monotone in j, and
   opt[l-1][j] <= opt[l][j] (Knuth). All of it is vectorized in numpy across the groups
   of a chunk (see optimal_partition):
   - pruning: the cost B of a good k-partition (cube-root-density quantiles, then a few
     Lloyd steps: within a few % of the optimum) bounds the optimum, so a prefix whose
     cost exceeds B, or whose suffix cannot be clustered within B by the clusters left
     (from the same program run on the mirrored points), lies on no optimal path.
     Early layers keep a short prefix of rows, late layers a narrow band;
   - a layer is solved by divide and conquer on j (rows between the argmins of their
     solved neighbours, above the Knuth bound; long windows by branch and bound on
     blocks of candidates), or, where the argmins sit just above the Knuth bound, by
     short speculative windows widened until a monotonicity check proves them exact.
   All of these only skip candidates or prefixes that provably cannot be on an optimal
   path, so the result is an optimal partition (exact up to float64 round-off; on
   bf16 checkpoints it is the very partition of a plain scan).
4. Indices are finally re-assigned to the nearest fp16-rounded LUT entry (never worse
   than keeping the DP clusters, which is what coremltools keeps).

A partial last group (out_features % group_size != 0) is rejected: iOS18
constexpr_lut_to_dense needs every indices dim divisible by the LUT's group dim.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..settings.limits import DEFAULT_GROUP_SIZE, LUT_BITS as ALLOWED_BITS

log = logging.getLogger(__name__)


# Number of fp16 bit patterns: the histogram width per group.
_FP16_KEYS = 1 << 16
# Groups clustered together: bounds the histograms (groups x 65536 bins), the
# backtracking table (2**bits x groups x distinct values, int16) and the mirrored suffix
# costs (2**bits / 2 x groups x distinct values, float64) to a few hundred MB.
_GROUPS_PER_CHUNK = 64
# A cluster made only of zero-weight padding has no mean: divide by at least this.
_TINY_WEIGHT = 1e-300

# Dynamic program tuning (none of these changes the result, only the time):
# windows of at most this many candidates are scanned one offset at a time, across all
# windows at once; longer ones as rows of a block view.
_SHORT_WINDOW = 12
# Windows of at least this many candidates are searched by branch and bound on blocks.
_BOUND_WINDOW = 1024
# Margin of the branch-and-bound test, relative to the group's total squared deviation:
# far above float64 round-off (1e-16 relative), far below real cost differences.
_BOUND_RTOL = 1e-12
# A layer is solved by speculative windows (see _speculative_layer) when the previous
# layer's rows needed at most this many candidates on average; else by divide and conquer.
_SPECULATE_MAX_NEED = 6.0
# ... and when at most this many times the rows (bounded by pruning) are candidates.
_SPECULATE_ROWS = 1.05
# Initial speculative window: the Knuth bound and the next candidates, this many in all.
_SPECULATE_WIDTH = 3
# Rounds of window doubling for argmins found on their window's top edge.
_EDGE_ROUNDS = 4
# Every this many rows are sampled to measure a layer's average window need.
_NEED_SAMPLE = 8
# Lloyd iterations for the upper bound used to prune the dynamic program.
_LLOYD_ROUNDS = 4
# From this many clusters on, the second half of the layers is banded (two-sided pruning).
_BANDED_MIN_CLUSTERS = 8


@dataclass(frozen=True)
class LutPack:
    """A palettized matrix: W[r, c] ~= lut[r // group_size, indices[r, c]] * row_scale[r]."""

    indices: np.ndarray  # uint8 [out, in], values < 2**bits
    lut: np.ndarray  # float16 [out // group_size, 2**bits], entries ascending
    row_scale: np.ndarray | None  # float16 [out] or None
    bits: int
    group_size: int

    def __post_init__(self):
        check_lut_pack(self, where="LutPack")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.indices.shape)

    @property
    def num_groups(self) -> int:
        return self.lut.shape[0]

    def dequantize_fp16(self) -> np.ndarray:
        """The dense weight exactly as the Core ML constexpr ops produce it (fp16)."""
        dense = self._lookup(self.lut)  # (out, in) fp16
        if self.row_scale is not None:
            # fp16 x fp16 is exact in fp32; one rounding back to fp16, as the runtime does.
            dense = (dense.astype(np.float32) * self.row_scale.astype(np.float32)[:, None]).astype(
                np.float16
            )
        return dense

    def dequantize(self) -> np.ndarray:
        if self.row_scale is None:  # fp16 -> fp32 is exact: look up fp32 entries directly
            return self._lookup(self.lut.astype(np.float32))
        return self.dequantize_fp16().astype(np.float32)

    def _lookup(self, lut: np.ndarray) -> np.ndarray:
        """lut[group, index] for every element, (out, in) in lut's dtype."""
        out_features, in_features = self.indices.shape
        grouped_indices = self.indices.reshape(self.num_groups, -1)  # (G, group_size*in)
        dense = np.empty(grouped_indices.shape, lut.dtype)
        for group in range(self.num_groups):  # indices < 2**bits: checked at construction
            np.take(lut[group], grouped_indices[group], out=dense[group], mode="clip")
        return dense.reshape(out_features, in_features)


def check_lut_pack(pack: LutPack, where: str) -> None:
    """Raise ValueError (one line, naming `where`) if the pack's arrays do not fit together."""
    if pack.bits not in ALLOWED_BITS:
        raise ValueError(f"{where}: bits={pack.bits} is not one of {ALLOWED_BITS}")
    if pack.group_size < 1:
        raise ValueError(f"{where}: group_size={pack.group_size} must be >= 1")
    if pack.indices.ndim != 2 or pack.indices.dtype != np.uint8:
        raise ValueError(
            f"{where}: indices must be uint8 [out, in], got {pack.indices.dtype} "
            f"{list(pack.indices.shape)}"
        )
    out_features = pack.indices.shape[0]
    if out_features % pack.group_size:
        raise ValueError(
            f"{where}: out_features={out_features} is not a multiple of "
            f"group_size={pack.group_size}"
        )
    lut_shape = (out_features // pack.group_size, 1 << pack.bits)
    if pack.lut.dtype != np.float16 or pack.lut.shape != lut_shape:
        raise ValueError(
            f"{where}: lut must be float16 {list(lut_shape)}, got {pack.lut.dtype} "
            f"{list(pack.lut.shape)}"
        )
    if not np.all(np.isfinite(pack.lut)):
        raise ValueError(f"{where}: lut holds non-finite values")
    if pack.row_scale is not None and (
        pack.row_scale.dtype != np.float16 or pack.row_scale.shape != (out_features,)
    ):
        raise ValueError(
            f"{where}: row_scale must be float16 [{out_features}], got {pack.row_scale.dtype} "
            f"{list(pack.row_scale.shape)}"
        )
    if pack.indices.size and int(pack.indices.max()) >= (1 << pack.bits):
        raise ValueError(
            f"{where}: index {int(pack.indices.max())} out of range for {pack.bits}-bit LUT"
        )


def fit_grouped_lut(
    weight: np.ndarray,
    bits: int,
    group_size: int = DEFAULT_GROUP_SIZE,
    per_channel_scale: bool = False,
) -> LutPack:
    """Palettize `weight` [out, in] with one optimal k-means LUT per `group_size` rows.

    per_channel_scale: divide each row by its fp16 absmax first (re-applied at
    dequantization); the k-means then weighs every element by its row scale squared,
    so it still minimizes the error in the original units.
    """
    weight = np.asarray(weight)
    if bits not in ALLOWED_BITS:
        raise ValueError(f"bits={bits} is not one of the allowed values {ALLOWED_BITS}")
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {list(weight.shape)}")
    if not np.issubdtype(weight.dtype, np.floating):
        raise ValueError(f"weight must be floating point, got {weight.dtype}")
    if group_size < 1:
        raise ValueError(f"group_size={group_size} must be >= 1")
    out_features, in_features = weight.shape
    if out_features % group_size:
        raise ValueError(
            f"weight shape {list(weight.shape)}: out_features={out_features} is not a multiple "
            f"of group_size={group_size} (iOS18 grouped LUTs need whole groups; pick a divisor)"
        )
    weight = weight.astype(np.float32, copy=False)

    row_scale = None
    row_weight = None  # k-means weight of every element of a row: its scale squared
    values = weight
    if per_channel_scale:
        _check_finite(weight)
        row_absmax = np.abs(weight).max(axis=1)
        row_scale = row_absmax.astype(np.float16)
        row_scale[row_scale == 0] = 1  # an all-zero row stays all zero
        if not np.all(np.isfinite(row_scale)):
            raise ValueError("row absmax overflows fp16; cannot store the row scale")
        scale32 = row_scale.astype(np.float32)
        values = weight / scale32[:, None]
        row_weight = scale32.astype(np.float64) ** 2

    with np.errstate(over="ignore", invalid="ignore"):
        values16 = values.astype(np.float16)
    keys = values16.view(np.uint16)  # (out, in) raw fp16 bit patterns
    if np.any((keys & _FP16_EXPONENT) == _FP16_EXPONENT):  # inf or NaN after the cast
        _check_finite(weight)
        raise ValueError(
            f"weight {list(weight.shape)} has values beyond fp16 range (|w| > 65504)"
        )

    num_groups = out_features // group_size
    lut = np.empty((num_groups, 1 << bits), np.float16)
    indices = np.empty((num_groups, group_size * in_features), np.uint8)  # (G, group_size*in)
    group_keys = keys.reshape(num_groups, group_size * in_features)  # (G, group_size*in)
    for start in range(0, num_groups, _GROUPS_PER_CHUNK):
        stop = min(start + _GROUPS_PER_CHUNK, num_groups)
        chunk_weight = None
        if row_weight is not None:
            chunk_weight = row_weight[start * group_size : stop * group_size].reshape(
                stop - start, group_size
            )
        lut[start:stop] = _fit_chunk(
            group_keys[start:stop], chunk_weight, in_features, bits, indices[start:stop]
        )
    indices = indices.reshape(out_features, in_features)
    log.debug("grouped LUT %s bits=%d group=%d scale=%s", list(weight.shape), bits, group_size,
              per_channel_scale)
    return LutPack(indices=indices, lut=lut, row_scale=row_scale, bits=bits, group_size=group_size)


def _check_finite(weight: np.ndarray) -> None:
    if not np.all(np.isfinite(weight)):
        raise ValueError(f"weight {list(weight.shape)} holds non-finite values")


def _fp16_value_order() -> np.ndarray:
    """The finite fp16 bit patterns, sorted by the value they encode (NaN / inf left out)."""
    patterns = np.arange(_FP16_KEYS, dtype=np.uint32).astype(np.uint16)
    values = patterns.view(np.float16)
    finite = np.flatnonzero(np.isfinite(values))
    return finite[np.argsort(values[finite], kind="stable")]


_VALUE_ORDER = _fp16_value_order()  # (63488,) raw bit patterns in ascending value order
_FP16_EXPONENT = 0x7C00  # all-ones exponent: inf or NaN


def _fit_chunk(
    group_keys: np.ndarray,
    row_weight: np.ndarray | None,
    in_features: int,
    bits: int,
    indices: np.ndarray,
) -> np.ndarray:
    """Exact k-means for a chunk of groups: fills indices [C, group_size*in], returns the LUT.

    group_keys: (C, group_size*in) fp16 bit patterns; row_weight: (C, group_size) element
    weight of each row, or None for unit weights.
    """
    num_groups = group_keys.shape[0]
    histogram = np.empty((num_groups, _VALUE_ORDER.size))  # (C, V) in ascending value order
    for group in range(num_groups):
        counts = np.bincount(
            group_keys[group],
            weights=None if row_weight is None else np.repeat(row_weight[group], in_features),
            minlength=_FP16_KEYS,
        )
        histogram[group] = counts[_VALUE_ORDER]
    present = [np.flatnonzero(row) for row in histogram]  # value ranks present per group
    distinct = np.array([p.size for p in present])
    num_points = int(distinct.max())

    # Padded sorted point lists: (C, M). Padding repeats the last value with weight 0.
    point_rank = np.empty((num_groups, num_points), np.intp)
    point_weight = np.zeros((num_groups, num_points))
    for group, ranks in enumerate(present):
        point_rank[group, : ranks.size] = ranks
        point_rank[group, ranks.size :] = ranks[-1]
        point_weight[group, : ranks.size] = histogram[group, ranks]
    point_value = _VALUE_ORDER[point_rank].astype(np.uint16).view(np.float16).astype(np.float64)

    num_clusters = min(1 << bits, num_points)
    if num_clusters == num_points:
        bounds = np.broadcast_to(np.arange(num_points + 1), (num_groups, num_points + 1))
    else:
        bounds = optimal_partition(point_value, point_weight, num_clusters)  # (C, k+1)

    centroids = _cluster_means(point_value, point_weight, bounds)  # (C, k) ascending
    lut = np.empty((num_groups, 1 << bits), np.float16)
    lut[:, :num_clusters] = centroids.astype(np.float16)
    lut[:, num_clusters:] = lut[:, num_clusters - 1 : num_clusters]  # unused entries

    labels = _nearest_entry(point_value, lut)  # (C, M) uint8
    label_table = np.zeros(_FP16_KEYS, np.uint8)  # by raw bit pattern
    for group, ranks in enumerate(present):  # element -> label, through its bit pattern
        label_table[_VALUE_ORDER[ranks]] = labels[group, : ranks.size]
        np.take(label_table, group_keys[group], out=indices[group], mode="clip")
    return lut


def _cluster_means(values: np.ndarray, weights: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Weighted mean of each cluster [bounds[:, c], bounds[:, c+1]); empty-weight -> its first value."""
    num_groups = values.shape[0]
    prefix_w = np.zeros((num_groups, values.shape[1] + 1))
    prefix_s = np.zeros_like(prefix_w)
    np.cumsum(weights, axis=1, out=prefix_w[:, 1:])
    np.cumsum(weights * values, axis=1, out=prefix_s[:, 1:])
    rows = np.arange(num_groups)[:, None]
    lo, hi = bounds[:, :-1], bounds[:, 1:]
    cluster_w = prefix_w[rows, hi] - prefix_w[rows, lo]
    cluster_s = prefix_s[rows, hi] - prefix_s[rows, lo]
    first_value = values[rows, np.minimum(lo, values.shape[1] - 1)]
    has_weight = cluster_w > 0
    means = np.where(has_weight, cluster_s / np.where(has_weight, cluster_w, 1), first_value)
    return np.maximum.accumulate(means, axis=1)  # keep ascending through fp rounding


def _nearest_entry(values: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Index of the nearest entry of each group's ascending fp16 LUT, for (C, M) values."""
    num_groups, num_entries = lut.shape
    lut64 = lut.astype(np.float64)
    # Shift every group into its own disjoint range so one searchsorted serves all groups.
    offset = (np.arange(num_groups) * 4.0 * 65536.0)[:, None]
    upper = np.searchsorted((lut64 + offset).reshape(-1), (values + offset).reshape(-1))
    upper = upper.reshape(values.shape) - (np.arange(num_groups) * num_entries)[:, None]
    upper = np.clip(upper, 1, num_entries - 1) if num_entries > 1 else np.zeros_like(upper)
    lower = np.maximum(upper - 1, 0)
    rows = np.arange(num_groups)[:, None]
    take_upper = np.abs(lut64[rows, upper] - values) < np.abs(values - lut64[rows, lower])
    return np.where(take_upper, upper, lower).astype(np.uint8)


def optimal_partition(values: np.ndarray, weights: np.ndarray, num_clusters: int) -> np.ndarray:
    """Optimal weighted 1-D k-means of sorted points, for a batch of independent rows.

    values, weights: (C, M) float64, each row ascending; zero weights are allowed.
    Returns bounds (C, k+1) int: cluster c holds points bounds[:, c] .. bounds[:, c+1]-1,
    with bounds[:, 0] = 0 and bounds[:, k] = M. Requires 1 <= k <= M.

    Pruning (exact): B = the cost of a good k-partition bounds the optimum. A prefix j
    whose optimal l-cluster cost D[l][j] exceeds B lies on no optimal path, nor does one
    whose suffix needs more than B with the clusters left for it. Layers 1..k/2 run
    forward with the first test only (prefix costs grow with j, so each layer keeps a
    prefix of its rows; `_prefix_layers`). The same runs backward on the mirrored
    points for the clusters left after k/2 forward ones, giving the optimal suffix costs.
    The remaining forward layers then keep only rows passing both tests: a narrow band
    around the optimal cut (`_banded_layers`).
    """
    values = np.asarray(values, np.float64)
    weights = np.asarray(weights, np.float64)
    num_groups, num_points = values.shape
    k = num_clusters
    if not 1 <= k <= num_points:
        raise ValueError(f"num_clusters={k} must be in [1, {num_points}]")
    forward = _Sums(values, weights)
    bound = forward.partition_bound(k)
    bound = bound * (1 + _BOUND_RTOL) + forward.slack[:: forward.stride]
    split = k - 1 if k < _BANDED_MIN_CLUSTERS else k // 2
    opt = np.zeros((k, num_groups, forward.stride), forward.index_dtype)
    state = _prefix_layers(forward, k, bound, split, opt)
    if split < k - 1:
        # Suffix costs: layer r of the mirrored problem = suffixes holding r+1 clusters.
        mirrored = _Sums(-values[:, ::-1], weights[:, ::-1])
        suffix = []
        _prefix_layers(mirrored, k, bound, k - split - 3, None, suffix)
        _banded_layers(forward, k, bound, split, opt, state, suffix)

    bounds = np.empty((num_groups, k + 1), np.int64)
    bounds[:, k] = num_points
    end = np.full(num_groups, num_points)
    group = np.arange(num_groups)
    for layer in range(k - 1, 0, -1):
        end = opt[layer][group, end].astype(np.int64)
        bounds[:, layer] = end
    bounds[:, 0] = 0
    return bounds


class _Sums:
    """Centered prefix sums of a batch of sorted point lists, flat (all groups back to
    back), padded by one row so that a window of up to `stride` candidates starting
    anywhere stays inside the arrays (for the strided block views)."""

    def __init__(self, values, weights):
        num_groups, num_points = values.shape
        self.num_groups, self.num_points = num_groups, num_points
        self.stride = stride = num_points + 1
        self.size = size = num_groups * stride
        self.base = (np.arange(num_groups) * stride)[:, None]  # flat offset of each group
        self.index_dtype = np.int16 if stride < np.iinfo(np.int16).max else np.int32
        # Center each row: smaller prefix sums, less cancellation in S2 - S1^2/W.
        total_w = weights.sum(axis=1, keepdims=True)
        mean = (weights * values).sum(axis=1, keepdims=True) / np.maximum(total_w, _TINY_WEIGHT)
        self.points = values - mean
        self.w = np.zeros(size + stride)
        self.s1 = np.zeros(size + stride)
        self.s2 = np.zeros(size + stride)
        np.cumsum(weights, axis=1, out=self.rows(self.w)[:, 1:])
        np.cumsum(weights * self.points, axis=1, out=self.rows(self.s1)[:, 1:])
        np.cumsum(weights * self.points**2, axis=1, out=self.rows(self.s2)[:, 1:])
        # Round-off margin for pruning tests: far above the float64 error of sums of this
        # size, far below any real difference between two partitions.
        total = np.abs(self.rows(self.s2)[:, -1])  # total squared deviation per group
        self.slack = np.repeat(_BOUND_RTOL * (total + _TINY_WEIGHT), stride)

    def rows(self, flat):
        return flat[: self.size].reshape(self.num_groups, self.stride)

    def first_cost(self):
        """E of layer 0: the cost of prefix j as one cluster, less S2[j] (= -S1^2/W)."""
        e = np.full(self.size + self.stride, np.inf)
        np.divide(-self.rows(self.s1) ** 2, np.maximum(self.rows(self.w), _TINY_WEIGHT),
                  out=self.rows(e))
        return e

    def layer(self, e):
        return _Layer(e, self.w, self.s1, self.s2, self.slack)

    def partition_bound(self, k):
        return _partition_bound(self.rows(self.w), self.rows(self.s1), self.rows(self.s2),
                                self.points, k)


def _prefix_layers(sums: _Sums, k, bound, last_layer, opt, costs=None):
    """Layers 1..last_layer of the DP, keeping in each the prefix of rows whose cost is at
    most `bound` (G,). Fills opt (if given) and appends each layer's row costs D (G, stride;
    inf where dropped) to `costs` (if given), layer 0 included. Returns the state after
    the last layer: (E (flat), last kept row (G,), Knuth lower bounds (G, stride) or None).

    Kept rows get exact values: the optimal predecessor of a kept row is kept too (its
    cost is lower). Rows j with cost(last kept, j) > bound cannot be kept (their last
    cluster alone costs too much) and are not computed at all.
    """
    num_groups, stride, base = sums.num_groups, sums.stride, sums.base
    num_points = sums.num_points
    group = np.arange(num_groups)
    columns = np.arange(stride)
    prefix_cost = sums.first_cost()
    s2_rows = sums.rows(sums.s2)
    kept = _last_at_most(sums.rows(prefix_cost) + s2_rows, bound, 0)  # (G,) rows
    sums.rows(prefix_cost)[columns > kept[:, None]] = np.inf
    if costs is not None:
        costs.append((sums.rows(prefix_cost) + s2_rows, kept))
    lower_all = np.zeros((num_groups, stride), np.intp)  # previous layer's argmins
    need = np.inf  # average candidates per row that the previous layer needed
    for layer in range(1, last_layer + 1):
        # This layer places cluster number layer+1: prefix j needs j >= layer+1 points
        # and must leave k-layer-1 points for the clusters after it.
        j_lo, j_hi = layer + 1, num_points - (k - layer - 1)
        if layer == k - 1:
            j_lo = j_hi = num_points  # the last layer only needs the full prefix
        j_hi = max(j_lo, int(_last_affordable(sums, kept, j_lo, j_hi, bound).max()))
        num_j = j_hi - j_lo + 1
        pre = sums.layer(prefix_cost)
        lower = np.maximum(lower_all[:, j_lo : j_hi + 1], layer)  # Knuth lower bound
        lower += base
        last = kept + base[:, 0]  # (G,) last candidate with a finite cost
        if need <= _SPECULATE_MAX_NEED and 1 < num_j <= _SPECULATE_ROWS * (kept.min() + 1 - j_lo):
            best, arg = _speculative_layer(pre, lower, j_lo, num_j, base, last)
        else:
            cutoff = bound[:, None] - s2_rows[:, j_lo : j_hi + 1]
            best, arg = _exact_layer(pre, lower, j_lo, num_j, base, last, cutoff)
        arg -= base
        kept = _last_at_most(best + s2_rows[:, j_lo : j_hi + 1], bound, j_lo)
        rows = int(kept.min()) - j_lo  # rows computed in every group
        if rows > 0:
            sample = slice(0, rows, _NEED_SAMPLE)
            need = float((arg[:, 1:][:, sample] - lower[:, :-1][:, sample] + base).mean()) + 1
        # The next layer's E = D - S2: inf where prefix i cannot hold layer+1 clusters or
        # was dropped.
        prefix_cost = np.full(sums.size + stride, np.inf)
        sums.rows(prefix_cost)[:, j_lo : j_hi + 1] = np.where(
            columns[j_lo : j_hi + 1] <= kept[:, None], best, np.inf
        )
        if costs is not None:
            costs.append((sums.rows(prefix_cost) + s2_rows, kept))
        # Beyond the kept rows, repeat the last kept argmin: a valid Knuth lower bound for
        # the next layer (argmins grow with j and with l). Below j_lo: the smallest start.
        lower_all[:, j_lo : j_hi + 1] = arg
        lower_all[:, j_lo:] = lower_all[group[:, None], np.minimum(columns[j_lo:], kept[:, None])]
        lower_all[:, :j_lo] = layer
        if opt is not None:
            opt[layer] = lower_all
    return prefix_cost, kept


def _banded_layers(sums: _Sums, k, bound, split, opt, state, suffix):
    """Forward layers split+1 .. k-1, keeping the rows whose prefix cost plus optimal
    suffix cost (from the mirrored layers in `suffix`) is at most `bound`.

    Only the band of rows between the first and the last kept row is computed, from the
    previous band as candidates. Rows of a band that fail the test may get too high a
    cost (their best predecessor may lie outside the previous band), which is harmless:
    it is still the cost of a real partition, and every row on an optimal path passes the
    test with an exact cost. Within a layer the argmins are monotone, so the rows are
    solved by divide and conquer; no bound across layers is used.
    """
    num_groups, stride, base = sums.num_groups, sums.stride, sums.base
    num_points = sums.num_points
    columns = np.arange(stride)
    s2_rows = sums.rows(sums.s2)
    prefix_cost, kept = state
    band_lo = np.full(num_groups, split + 1)  # first candidate (prefix j >= split+1 points)
    band_hi = kept
    for layer in range(split + 1, k):
        j_lo, j_hi = layer + 1, num_points - (k - layer - 1)
        if layer == k - 1:
            j_lo = j_hi = num_points
        clusters_left = k - layer - 1
        if clusters_left:
            # Optimal cost of points j.. with the clusters left: mirrored prefix m - j.
            # Those within the bound are the mirrored prefixes up to its last kept row.
            mirrored_cost, mirrored_kept = suffix[clusters_left - 1]
            first = num_points - mirrored_kept  # (G,) first row with an affordable suffix
        else:
            first = np.full(num_groups, num_points)
        # Rows without a candidate below them or with too costly a suffix are dropped.
        row_lo = max(j_lo, int(np.maximum(first, band_lo + 1).min()))
        row_hi = _last_affordable(sums, band_hi, row_lo, j_hi, bound)
        row_hi = max(row_lo, int(row_hi.max()))
        rows = np.arange(row_lo, row_hi + 1)
        rest = mirrored_cost[:, num_points - rows] if clusters_left else np.zeros((num_groups, 1))
        num_j = row_hi - row_lo + 1
        lower = np.broadcast_to(band_lo[:, None] + base, (num_groups, num_j)).copy()
        cutoff = bound[:, None] - s2_rows[:, row_lo : row_hi + 1]
        best, arg = _exact_layer(sums.layer(prefix_cost), lower, row_lo, num_j, base,
                                 band_hi + base[:, 0], cutoff)
        arg -= base
        total = best + s2_rows[:, row_lo : row_hi + 1] + rest
        ok = total <= bound[:, None]
        any_ok = ok.any(axis=1)
        band_lo = row_lo + np.where(any_ok, np.argmax(ok, axis=1), 0)
        band_hi = row_lo + np.where(any_ok, num_j - 1 - np.argmax(ok[:, ::-1], axis=1), num_j - 1)
        prefix_cost = np.full(sums.size + stride, np.inf)
        in_band = (columns[row_lo : row_hi + 1] >= band_lo[:, None]) & (
            columns[row_lo : row_hi + 1] <= band_hi[:, None]
        )
        sums.rows(prefix_cost)[:, row_lo : row_hi + 1] = np.where(in_band, best, np.inf)
        opt[layer][:, row_lo : row_hi + 1] = arg


def _last_at_most(cost: np.ndarray, bound: np.ndarray, first: int) -> np.ndarray:
    """Per row of cost (G, n), nondecreasing: first + the last index with cost <= bound.

    Falls back to the last index if none is (round-off on a degenerate group): no pruning.
    """
    within = cost <= bound[:, None]
    last = cost.shape[1] - 1 - np.argmax(within[:, ::-1], axis=1)
    return first + np.where(within.any(axis=1), last, cost.shape[1] - 1)


def _last_affordable(sums, kept, j_lo, j_hi, bound):
    """Per group, the last prefix j in [j_lo, j_hi] with cost(kept, j) <= bound: a last
    cluster that starts at or before the last kept point and ends at j costs at least
    that much. Binary search (the cost grows with j). Returns (G,) row indices."""
    prefix_w, prefix_s1, prefix_s2, base = sums.w, sums.s1, sums.s2, sums.base[:, 0]
    lo = np.clip(kept + 1, j_lo, j_hi)
    hi = np.full(kept.shape, j_hi)
    start = base + kept
    while True:
        open_ = lo < hi
        if not open_.any():
            return lo
        mid = (lo + hi + 1) >> 1
        fj = base + mid
        dw = np.maximum(prefix_w[fj] - prefix_w[start], _TINY_WEIGHT)
        cost = prefix_s2[fj] - prefix_s2[start] - (prefix_s1[fj] - prefix_s1[start]) ** 2 / dw
        ok = cost <= bound
        lo = np.where(open_ & ok, mid, lo)
        hi = np.where(open_ & ~ok, mid - 1, hi)


def _partition_bound(prefix_w, prefix_s1, prefix_s2, points, k):
    """Cost of a good k-partition of every group (an upper bound on the optimum), (G,).

    Start from the high-resolution optimum: centroid density proportional to the cube
    root of the point density, i.e. cuts at equal quantiles of sum(w**(1/3) * dx**(2/3))
    (dx: spacing around a point); then a few Lloyd iterations on the sorted points.
    """
    num_groups, stride = prefix_w.shape
    group = np.arange(num_groups)[:, None]
    weights = np.diff(prefix_w, axis=1)  # (G, M)
    spacing = np.empty_like(points)
    spacing[:, 1:-1] = (points[:, 2:] - points[:, :-2]) / 2
    spacing[:, 0] = points[:, 1] - points[:, 0] if points.shape[1] > 1 else 1
    spacing[:, -1] = points[:, -1] - points[:, -2] if points.shape[1] > 1 else 1
    share = np.cumsum(np.cbrt(weights) * np.cbrt(spacing) ** 2, axis=1)  # (G, M)
    targets = share[:, -1:] * (np.arange(1, k) / k)
    cuts = np.empty((num_groups, k + 1), np.intp)
    cuts[:, 0], cuts[:, k] = 0, stride - 1
    for g in range(num_groups):
        cuts[g, 1:k] = np.searchsorted(share[g], targets[g]) + 1
    np.clip(cuts, 0, stride - 1, out=cuts)
    np.maximum.accumulate(cuts, axis=1, out=cuts)

    def cost_of(cuts):
        w = np.diff(prefix_w[group, cuts], axis=1)
        s1 = np.diff(prefix_s1[group, cuts], axis=1)
        s2 = np.diff(prefix_s2[group, cuts], axis=1)
        return (s2 - s1**2 / np.maximum(w, _TINY_WEIGHT)).sum(axis=1), w, s1

    best, w, s1 = cost_of(cuts)
    # Point p lies between prefixes p and p+1; its (centered) value is the prefix slope.
    for _ in range(_LLOYD_ROUNDS):
        mean = s1 / np.maximum(w, _TINY_WEIGHT)  # (G, k) centroids, 0 for empty clusters
        mid = (mean[:, 1:] + mean[:, :-1]) / 2  # boundaries between neighbours
        new = cuts.copy()
        for g in range(num_groups):  # the first point at or above each boundary
            new[g, 1:k] = np.searchsorted(points[g], mid[g])
        np.maximum.accumulate(new, axis=1, out=new)
        cost, new_w, new_s1 = cost_of(new)
        improved = cost < best
        best = np.where(improved, cost, best)
        cuts[improved], w[improved], s1[improved] = new[improved], new_w[improved], new_s1[improved]
    return best


class _Layer:
    """One DP layer's flat arrays (all groups back to back, one padding row at the end).

    The value of candidate i for prefix j (same group) is
        e[i] - (s1[j] - s1[i])**2 / max(w[j] - w[i], tiny)
    which is D_prev[i] + cost(i, j) - S2[j]: S2[j] is the same for every candidate, so it
    is left out of the comparison. All index arrays below are flat indices into these.
    """

    __slots__ = ("e", "w", "s1", "s2", "slack")

    def __init__(self, e, w, s1, s2, slack):
        self.e, self.w, self.s1, self.s2, self.slack = e, w, s1, s2, slack

    def values(self, fj_w, fj_s1, idx, out, tmp):
        """out <- values of candidates idx, for prefixes with w[j] = fj_w, s1[j] = fj_s1."""
        np.take(self.w, idx, out=tmp, mode="clip")
        np.subtract(fj_w, tmp, out=tmp)
        np.maximum(tmp, _TINY_WEIGHT, out=tmp)
        np.take(self.s1, idx, out=out, mode="clip")
        np.subtract(fj_s1, out, out=out)
        np.multiply(out, out, out=out)
        np.divide(out, tmp, out=out)
        np.take(self.e, idx, out=tmp, mode="clip")
        np.subtract(tmp, out, out=out)
        return out

    def block_values(self, fj, lo, hi, width):
        """(n, width) values of candidates lo .. lo+width-1 (those past hi: +inf)."""
        value = _rows_of(self.e, width, lo)
        dw = _rows_of(self.w, width, lo)
        ds = _rows_of(self.s1, width, lo)
        np.subtract(self.w[fj][:, None], dw, out=dw)
        np.maximum(dw, _TINY_WEIGHT, out=dw)
        np.subtract(self.s1[fj][:, None], ds, out=ds)
        np.multiply(ds, ds, out=ds)
        np.divide(ds, dw, out=ds)
        np.subtract(value, ds, out=value)
        extra = hi - lo
        if int(extra.min()) < width - 1:
            np.putmask(value, np.arange(width) > extra[:, None], np.inf)
        return value

    def block_min(self, fj, lo, hi, width):
        value = self.block_values(fj, lo, hi, width)
        at = value.argmin(axis=1)
        return value[np.arange(lo.size), at], lo + at


def _rows_of(flat: np.ndarray, width: int, starts: np.ndarray) -> np.ndarray:
    """Copy of flat[s : s+width] for every s in starts, as an (n, width) array."""
    view = np.lib.stride_tricks.as_strided(
        flat, (flat.size - width + 1, width), (flat.strides[0],) * 2, writeable=False
    )
    return view[starts]


def _window_min(pre: _Layer, fj, lo, hi):
    """Min and leftmost argmin over candidates [lo, hi] of prefix fj, per window (1-D)."""
    n = lo.size
    extra = hi - lo  # candidates beyond the first
    long_ = extra >= _SHORT_WINDOW
    if not long_.any():
        return _short_min(pre, fj, lo, extra)
    best = np.empty(n)
    arg = np.empty(n, np.intp)
    at = np.flatnonzero(long_)
    best[at], arg[at] = _long_min(pre, fj[at], lo[at], hi[at])
    at = np.flatnonzero(~long_)
    if at.size:
        best[at], arg[at] = _short_min(pre, fj[at], lo[at], extra[at])
    return best, arg


def _short_min(pre: _Layer, fj, lo, extra):
    """_window_min for windows of at most _SHORT_WINDOW candidates: one pass per offset."""
    n = lo.size
    fj_w = pre.w.take(fj)
    fj_s1 = pre.s1.take(fj)
    best = np.empty(n)
    tmp = np.empty(n)
    max_extra = int(extra.max()) if n else 0
    if max_extra == 0:
        return pre.values(fj_w, fj_s1, lo, best, tmp), lo.copy()
    # Longest windows first (a radix sort of small ints), so that the windows still open
    # at offset t are a prefix of the arrays.
    order = np.argsort(-extra.astype(np.int8), kind="stable")
    lo, fj_w, fj_s1 = lo[order], fj_w[order], fj_s1[order]
    still_open = n - np.cumsum(np.bincount(extra, minlength=max_extra + 1))
    pre.values(fj_w, fj_s1, lo, best, tmp)
    best_at = lo.copy()
    idx = np.empty(n, np.intp)
    val = np.empty(n)
    better = np.empty(n, bool)
    for t in range(1, max_extra + 1):
        m = int(still_open[t - 1])
        np.add(lo[:m], t, out=idx[:m])
        pre.values(fj_w[:m], fj_s1[:m], idx[:m], val[:m], tmp[:m])
        np.less(val[:m], best[:m], out=better[:m])  # strict: the leftmost argmin stays
        np.copyto(best[:m], val[:m], where=better[:m])
        np.copyto(best_at[:m], idx[:m], where=better[:m])
    out_best = np.empty(n)
    out_at = np.empty(n, np.intp)
    out_best[order] = best
    out_at[order] = best_at
    return out_best, out_at


def _long_min(pre: _Layer, fj, lo, hi):
    """_window_min for long windows, in buckets of similar length (rows of block views).

    Windows of _BOUND_WINDOW candidates or more go through a branch and bound over
    blocks of candidates. For i in a block [p, q]: D_prev[i] >= D_prev[p] (more points
    never cost less) and cost(i, j) >= cost(q, j) (a shorter cluster never costs more),
    so D_prev[p] + cost(q, j) bounds the block from below. The block with the lowest
    bound is scanned first; blocks whose bound exceeds that scan's minimum by more than
    a round-off margin cannot hold the minimum (or a tie), and the others are scanned.
    """
    n = lo.size
    length = hi - lo + 1
    best = np.empty(n)
    arg = np.empty(n, np.intp)
    bucket = np.log2(length).astype(np.int8)
    order = np.argsort(bucket, kind="stable")
    edges = np.searchsorted(bucket[order], np.arange(int(bucket.min()), int(bucket.max()) + 2))
    for start, stop in zip(edges[:-1].tolist(), edges[1:].tolist()):
        if start == stop:
            continue
        sel = order[start:stop]
        s_fj, s_lo, s_hi = fj[sel], lo[sel], hi[sel]
        width = int(length[sel].max())
        if width < _BOUND_WINDOW:
            best[sel], arg[sel] = pre.block_min(s_fj, s_lo, s_hi, width)
        else:
            best[sel], arg[sel] = _bound_min(pre, s_fj, s_lo, s_hi, width)
    return best, arg


def _bound_min(pre: _Layer, fj, lo, hi, width):
    num = lo.size
    rows = np.arange(num)
    block = 1 << max(2, int(round(np.log2(np.sqrt(width / 3)))))
    num_blocks = -(-width // block)
    p = lo[:, None] + block * np.arange(num_blocks)  # (n, blocks) first candidate
    outside = p > hi[:, None]
    np.minimum(p, hi[:, None], out=p)
    q = np.minimum(p + (block - 1), hi[:, None])  # last candidate
    dw = pre.w.take(q)
    np.subtract(pre.w[fj][:, None], dw, out=dw)
    np.maximum(dw, _TINY_WEIGHT, out=dw)
    ds = pre.s1.take(q)
    np.subtract(pre.s1[fj][:, None], ds, out=ds)
    np.multiply(ds, ds, out=ds)
    np.divide(ds, dw, out=ds)
    # D_prev[p] + cost(q, j) - S2[j], in the units of the candidate values.
    bound = pre.e.take(p)
    bound += pre.s2.take(p)
    bound -= pre.s2.take(q)
    bound -= ds
    bound[outside] = np.inf
    first = bound.argmin(axis=1)
    best, arg = pre.block_min(fj, p[rows, first], q[rows, first], block)
    open_ = bound <= (best + pre.slack[fj])[:, None]
    open_[rows, first] = False
    wi, bi = np.nonzero(open_)
    if wi.size:
        more_best, more_arg = pre.block_min(fj[wi], p[wi, bi], q[wi, bi], block)
        window = np.concatenate([rows, wi])
        value = np.concatenate([best, more_best])
        at = np.concatenate([arg, more_arg])
        order = np.lexsort((at, value, window))  # per window: min value, then leftmost
        lead = np.ones(order.size, bool)
        lead[1:] = window[order[1:]] != window[order[:-1]]
        best, arg = value[order[lead]], at[order[lead]]
    return best, arg


def _exact_layer(pre: _Layer, lower, j_lo, num_j, base, last, cutoff):
    """Row minima of prefixes j_lo .. j_lo+num_j-1 of every group, exactly.

    Divide and conquer on j in stride-halving order: the argmins are monotone in j, so a
    row's candidates lie between the argmins of its nearest solved rows on either side
    (and above its Knuth lower bound). O(m log m) candidates per group. lower: (G, J)
    flat Knuth lower bounds; last: (G,) flat last candidate with a finite cost; cutoff:
    (G, J) values above which a row is dropped (rows above a dropped one are dropped too,
    as values grow with j, and are not computed: their value stays inf).
    Returns (values, flat argmins), both (G, J).
    """
    num_groups = lower.shape[0]
    arg = lower.copy()
    best = np.full((num_groups, num_j), np.inf)
    fj_all = np.arange(j_lo, j_lo + num_j) + base  # (G, J) flat prefix index
    cand_hi = np.minimum(fj_all - 1, last[:, None])  # (G, J) last candidate of each row
    top = num_j - 1  # the top row first, over all its candidates: then every row has a right anchor
    top_lo = np.minimum(lower[:, top], cand_hi[:, top])
    best[:, top], arg[:, top] = _window_min(pre, fj_all[:, top], top_lo, cand_hi[:, top])
    # Rows without candidates (below the first one) stay at inf and are not "dropped".
    cutoff = np.where(lower > cand_hi, np.inf, cutoff)
    # First dropped row of each group (num_j: none yet); it is a valid right anchor.
    limit = np.where(best[:, top] > cutoff[:, top], top, num_j)
    half = 1 << max(num_j - 1, 1).bit_length()
    while half > 1:
        half >>= 1
        cols = np.arange(half - 1, min(num_j - 1, int(limit.max())), 2 * half)
        if not cols.size:
            continue
        lo = lower[:, cols]
        left = cols - half
        first = int(np.searchsorted(left, 0))  # the first row with a left anchor
        np.maximum(lo[:, first:], arg[:, left[first:]], out=lo[:, first:])
        right = np.minimum(np.minimum(cols + half, top), limit[:, None])
        hi = np.minimum(np.take_along_axis(arg, right, axis=1), cand_hi[:, cols])
        np.minimum(lo, hi, out=lo)
        b, a = _window_min(pre, fj_all[:, cols].reshape(-1), lo.reshape(-1), hi.reshape(-1))
        b = b.reshape(lo.shape)
        best[:, cols] = b
        arg[:, cols] = a.reshape(lo.shape)
        dropped = b > cutoff[:, cols]
        np.minimum(limit, np.where(dropped, cols, num_j).min(axis=1), out=limit)
    return best, arg


def _speculative_layer(pre: _Layer, lower, j_lo, num_j, base, last):
    """Row minima from short windows that are then widened until they provably hold
    every row's argmin; for layers whose argmins sit just above their Knuth bound.

    Every row j starts with the window [L_j, L_j + _SPECULATE_WIDTH - 1] (L_j: Knuth
    bound). Exactness: argmins are monotone, opt_j <= opt_{j+1}. If row j's window
    reaches the computed argmin a_{j+1} of the next row (or its last candidate: j-1 or
    the last finite one), and a_{j+1} is exact,
    the window holds opt_j and its leftmost argmin is opt_j. The top row's window must
    reach j-1. So once every row passes this check, induction from the top row down
    shows that all rows are exact. Rows failing it get their window extended up to
    a_{j+1}, together with the rows below them (whose argmins tend to move with theirs),
    over 1, 2, 4, ... rows in successive rounds; windows only grow, so this terminates.
    Returns (values, flat argmins), both (G, J).
    """
    num_groups = lower.shape[0]
    size = num_groups * num_j
    lo = lower.reshape(-1)
    fj = (np.arange(j_lo, j_lo + num_j) + base).reshape(-1)
    jm1 = np.minimum(fj - 1, np.repeat(last, num_j))  # last candidate of each row
    top = np.minimum(lo + (_SPECULATE_WIDTH - 1), jm1)  # window: [lo, top]
    fj_w = pre.w.take(fj)
    fj_s1 = pre.s1.take(fj)
    best = np.empty(size)
    tmp = np.empty(size)
    pre.values(fj_w, fj_s1, lo, best, tmp)
    arg = lo.copy()
    idx = np.empty(size, np.intp)
    val = np.empty(size)
    better = np.empty(size, bool)
    for t in range(1, _SPECULATE_WIDTH):
        np.add(lo, t, out=idx)
        np.minimum(idx, top, out=idx)
        pre.values(fj_w, fj_s1, idx, val, tmp)
        np.less(val, best, out=better)
        np.copyto(best, val, where=better)
        np.copyto(arg, idx, where=better)

    def extend(rows, new_top):  # widen the windows of `rows` to [lo, new_top]
        b, a = _window_min(pre, fj[rows], top[rows] + 1, new_top)
        upd = b < best[rows]
        best[rows[upd]] = b[upd]
        arg[rows[upd]] = a[upd]
        top[rows] = new_top

    # An argmin on the window's top edge suggests a wider window: double it.
    rows = np.flatnonzero((arg == top) & (top < jm1))
    for _ in range(_EDGE_ROUNDS):
        if not rows.size:
            break
        extend(rows, np.minimum(2 * top[rows] - lo[rows] + 1, jm1[rows]))
        rows = rows[(arg[rows] == top[rows]) & (top[rows] < jm1[rows])]

    top_col = num_j - 1  # column of each group's top row
    bound = np.empty(size, np.intp)  # what row j's window must reach
    bound[:-1] = arg[1:]
    bound[top_col::num_j] = jm1[top_col::num_j]
    np.minimum(bound, jm1, out=bound)
    fail = np.flatnonzero(top < bound)
    reach = 1
    while fail.size:
        # Rows [f - reach + 1, f] of the same group, up to the bound of row f.
        span = np.minimum(reach, fail % num_j + 1)
        first = np.cumsum(span) - span
        rows = np.repeat(fail - span + 1 - first, span) + np.arange(int(span.sum()))
        new_top = np.repeat(bound[fail], span)
        if reach > 1:  # overlapping ranges: keep the largest bound of each row
            order = np.lexsort((-new_top, rows))
            rows, new_top = rows[order], new_top[order]
            lead = np.ones(rows.size, bool)
            lead[1:] = rows[1:] != rows[:-1]
            rows, new_top = rows[lead], new_top[lead]
        np.minimum(new_top, jm1[rows], out=new_top)
        grow = new_top > top[rows]
        rows, new_top = rows[grow], new_top[grow]
        extend(rows, new_top)
        # Re-check the rows whose window or next row's argmin changed.
        check = np.concatenate([rows, rows[rows % num_j > 0] - 1])
        check.sort()
        check = check[np.concatenate([[True], check[1:] != check[:-1]])]
        nxt = arg[np.minimum(check + 1, size - 1)]
        at_top = check % num_j == top_col
        nxt[at_top] = jm1[check[at_top]]
        np.minimum(nxt, jm1[check], out=nxt)
        bound[check] = nxt
        fail = check[top[check] < nxt]
        reach *= 2
    return best.reshape(num_groups, num_j), arg.reshape(num_groups, num_j)
