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
2. An fp16 number is a 16-bit pattern, so one `np.bincount` over (group, pattern) gives
   every group's distinct values with their counts in O(n), with no sort (the 65,536
   columns are then permuted into value order). A group of 128 rows of a bf16
   checkpoint holds about 3,000 distinct values for 262,144 weights.
3. 1-D k-means on sorted weighted points is a shortest k-link path problem whose cost
   matrix is Monge, so its optimum comes from a dynamic program over prefixes:
       D[l][j] = min_{i<j} D[l-1][i] + cost(i, j)
   with cost(i, j) the weighted squared error of points i..j-1 around their mean
   (O(1) from prefix sums). The argmin opt[l][j] is monotone in j, and
   opt[l-1][j] <= opt[l][j] (Knuth). Each DP layer is solved by divide and conquer on
   j, level by level, vectorized in numpy across all nodes of a level and all groups
   of a chunk: O(m log m) per layer and group, about 15 numpy calls per level.
4. Indices are finally re-assigned to the nearest fp16-rounded LUT entry (never worse
   than keeping the DP clusters, which is what coremltools keeps).

A partial last group (out_features % group_size != 0) is rejected: iOS18
constexpr_lut_to_dense needs every indices dim divisible by the LUT's group dim.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

ALLOWED_BITS = (1, 2, 3, 4, 6, 8)
DEFAULT_GROUP_SIZE = 128

# Number of fp16 bit patterns: the histogram width per group.
_FP16_KEYS = 1 << 16
# Groups clustered together: bounds the histogram (groups x 65536 bins) and the
# backtracking table (2**bits x groups x distinct values) to a few hundred MB.
_GROUPS_PER_CHUNK = 64
# A cluster made only of zero-weight padding has no mean: divide by at least this.
_TINY_WEIGHT = 1e-300


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
        out_features, in_features = self.indices.shape
        grouped_indices = self.indices.reshape(self.num_groups, -1)  # (G, group_size*in)
        dense = np.take_along_axis(self.lut, grouped_indices.astype(np.intp), axis=1)
        dense = dense.reshape(out_features, in_features)  # (out, in) fp16
        if self.row_scale is not None:
            # fp16 x fp16 is exact in fp32; one rounding back to fp16, as the runtime does.
            dense = (dense.astype(np.float32) * self.row_scale.astype(np.float32)[:, None]).astype(
                np.float16
            )
        return dense

    def dequantize(self) -> np.ndarray:
        return self.dequantize_fp16().astype(np.float32)


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
    if not np.all(np.isfinite(weight)):
        raise ValueError(f"weight {list(weight.shape)} holds non-finite values")

    row_scale = None
    element_weight = None
    values = weight
    if per_channel_scale:
        row_absmax = np.abs(weight).max(axis=1)
        row_scale = row_absmax.astype(np.float16)
        row_scale[row_scale == 0] = 1  # an all-zero row stays all zero
        if not np.all(np.isfinite(row_scale)):
            raise ValueError("row absmax overflows fp16; cannot store the row scale")
        scale32 = row_scale.astype(np.float32)
        values = weight / scale32[:, None]
        element_weight = np.repeat(scale32.astype(np.float64) ** 2, in_features)  # (out*in,)

    values16 = values.astype(np.float16)
    if not np.all(np.isfinite(values16)):
        raise ValueError(
            f"weight {list(weight.shape)} has values beyond fp16 range (|w| > 65504)"
        )
    keys = values16.view(np.uint16)  # (out, in) raw fp16 bit patterns

    num_groups = out_features // group_size
    lut = np.empty((num_groups, 1 << bits), np.float16)
    indices = np.empty((num_groups, group_size * in_features), np.uint8)  # (G, group_size*in)
    group_keys = keys.reshape(num_groups, group_size * in_features)  # (G, group_size*in)
    group_elem_weight = (
        None
        if element_weight is None
        else element_weight.reshape(num_groups, group_size * in_features)
    )
    for start in range(0, num_groups, _GROUPS_PER_CHUNK):
        stop = min(start + _GROUPS_PER_CHUNK, num_groups)
        lut[start:stop], label_tables = _fit_chunk(
            group_keys[start:stop],
            None if group_elem_weight is None else group_elem_weight[start:stop],
            bits,
        )
        for group in range(start, stop):  # element -> label, through its bit pattern
            indices[group] = label_tables[group - start][group_keys[group]]
    indices = indices.reshape(out_features, in_features)
    log.debug("grouped LUT %s bits=%d group=%d scale=%s", list(weight.shape), bits, group_size,
              per_channel_scale)
    return LutPack(indices=indices, lut=lut, row_scale=row_scale, bits=bits, group_size=group_size)


def _fp16_value_order() -> np.ndarray:
    """The finite fp16 bit patterns, sorted by the value they encode (NaN / inf left out)."""
    patterns = np.arange(_FP16_KEYS, dtype=np.uint32).astype(np.uint16)
    values = patterns.view(np.float16)
    finite = np.flatnonzero(np.isfinite(values))
    return finite[np.argsort(values[finite], kind="stable")]


_VALUE_ORDER = _fp16_value_order()  # (63488,) raw bit patterns in ascending value order


def _fit_chunk(group_keys: np.ndarray, group_elem_weight: np.ndarray | None, bits: int):
    """Exact k-means for a chunk of groups. Returns (lut [C, 2**bits] fp16, label table [C, 65536])."""
    num_groups = group_keys.shape[0]
    flat_key = group_keys.astype(np.intp) + (np.arange(num_groups) * _FP16_KEYS)[:, None]
    histogram = np.bincount(
        flat_key.reshape(-1),
        weights=None if group_elem_weight is None else group_elem_weight.reshape(-1),
        minlength=num_groups * _FP16_KEYS,
    ).reshape(num_groups, _FP16_KEYS)  # (C, 65536) count (or weight) per bit pattern
    histogram = histogram[:, _VALUE_ORDER]  # (C, V) columns now in ascending value order
    present = histogram > 0
    distinct = present.sum(axis=1)  # (C,)
    num_points = int(distinct.max())

    # Padded sorted point lists: (C, M). Padding repeats the last value with weight 0.
    group_idx, key_idx = np.nonzero(present)  # sorted by group, then key (= value)
    rank = np.cumsum(present, axis=1) - 1  # (C, V) position of each key among present ones
    position = rank[group_idx, key_idx]
    point_key = np.empty((num_groups, num_points), np.int64)
    point_weight = np.zeros((num_groups, num_points), np.float64)
    point_key[group_idx, position] = key_idx
    point_weight[group_idx, position] = histogram[group_idx, key_idx]
    pad = np.arange(num_points)[None, :] >= distinct[:, None]
    last_key = point_key[np.arange(num_groups), distinct - 1]
    point_key = np.where(pad, last_key[:, None], point_key)
    point_value = _VALUE_ORDER[point_key].astype(np.uint16).view(np.float16).astype(np.float64)

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
    label_table = np.zeros((num_groups, _FP16_KEYS), np.uint8)  # by raw bit pattern
    label_table[group_idx, _VALUE_ORDER[key_idx]] = labels[group_idx, position]
    return lut, label_table


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
    """
    num_groups, num_points = values.shape
    k = num_clusters
    if not 1 <= k <= num_points:
        raise ValueError(f"num_clusters={k} must be in [1, {num_points}]")
    stride = num_points + 1
    # Center each row: smaller prefix sums, less cancellation in S2 - S1^2/W.
    total_w = weights.sum(axis=1, keepdims=True)
    mean = (weights * values).sum(axis=1, keepdims=True) / np.maximum(total_w, _TINY_WEIGHT)
    centered = values - mean
    prefix_w = np.zeros((num_groups, stride))
    prefix_s1 = np.zeros_like(prefix_w)
    prefix_s2 = np.zeros_like(prefix_w)
    np.cumsum(weights, axis=1, out=prefix_w[:, 1:])
    np.cumsum(weights * centered, axis=1, out=prefix_s1[:, 1:])
    np.cumsum(weights * centered * centered, axis=1, out=prefix_s2[:, 1:])
    flat_w, flat_s1 = prefix_w.reshape(-1), prefix_s1.reshape(-1)

    index_dtype = np.int16 if stride < np.iinfo(np.int16).max else np.int32
    # opt[l][g, j]: start of the last cluster when prefix j holds l+1 clusters.
    opt = np.zeros((k, num_groups, stride), index_dtype)
    row_base = np.arange(num_groups) * stride  # flat offset of each group's prefix row
    # D for one cluster: the SSE of the whole prefix.
    cost_prev = prefix_s2 - prefix_s1**2 / np.maximum(prefix_w, _TINY_WEIGHT)

    for layer in range(1, k):
        # This layer places cluster number layer+1: prefix j needs j >= layer+1 points
        # and must leave k-layer-1 points for the clusters after it.
        j_lo, j_hi = layer + 1, num_points - (k - layer - 1)
        if layer == k - 1:
            j_lo = j_hi = num_points  # the last layer only needs the full prefix
        # D[j] = min_i D_prev[i] + S2[j] - S2[i] - (S1[j]-S1[i])^2 / (W[j]-W[i]).
        # S2[j] does not depend on i: minimize E[i] - ds^2/dw and add S2[j] afterwards.
        flat_e = (cost_prev - prefix_s2).reshape(-1)
        lower = opt[layer - 1]  # Knuth: opt[layer][j] >= opt[layer-1][j]
        cost_next = np.full((num_groups, stride), np.inf)

        node_g = np.arange(num_groups)
        node_jlo = np.full(num_groups, j_lo)
        node_jhi = np.full(num_groups, j_hi)
        node_olo = np.full(num_groups, layer)
        node_ohi = np.full(num_groups, j_hi - 1)
        while node_g.size:
            # One divide-and-conquer level for every node of every group at once: solve
            # the middle j of each node over its candidate range, as one ragged batch.
            mid = (node_jlo + node_jhi) >> 1
            cand_hi = np.minimum(node_ohi, mid - 1)
            cand_lo = np.minimum(np.maximum(node_olo, lower[node_g, mid]), cand_hi)
            count = cand_hi - cand_lo + 1
            seg_start = np.cumsum(count) - count
            total = int(seg_start[-1] + count[-1])
            flat_mid = row_base[node_g] + mid
            flat_i = np.arange(total) + np.repeat(row_base[node_g] + cand_lo - seg_start, count)
            dw = np.repeat(flat_w[flat_mid], count)
            dw -= flat_w.take(flat_i)
            ds = np.repeat(flat_s1[flat_mid], count)
            ds -= flat_s1.take(flat_i)
            np.maximum(dw, _TINY_WEIGHT, out=dw)
            ds *= ds
            ds /= dw
            value = flat_e.take(flat_i)
            value -= ds
            best = np.minimum.reduceat(value, seg_start)
            # Leftmost argmin of each segment: first position equal to the segment's min.
            hits = np.flatnonzero(value == np.repeat(best, count))
            best_at = flat_i[hits[np.searchsorted(hits, seg_start)]] - row_base[node_g]
            cost_next[node_g, mid] = best + prefix_s2[node_g, mid]
            opt[layer][node_g, mid] = best_at

            go_left = mid > node_jlo
            go_right = mid < node_jhi
            node_g, node_jlo, node_jhi, node_olo, node_ohi = (
                np.concatenate([node_g[go_left], node_g[go_right]]),
                np.concatenate([node_jlo[go_left], mid[go_right] + 1]),
                np.concatenate([mid[go_left] - 1, node_jhi[go_right]]),
                np.concatenate([node_olo[go_left], best_at[go_right]]),
                np.concatenate([best_at[go_left], node_ohi[go_right]]),
            )
        # Outside [j_lo, j_hi] keep opt monotone so it stays a valid Knuth lower bound.
        opt[layer][:, j_hi + 1 :] = opt[layer][:, j_hi : j_hi + 1]
        opt[layer][:, :j_lo] = layer
        cost_prev = cost_next

    bounds = np.empty((num_groups, k + 1), np.int64)
    bounds[:, k] = num_points
    end = np.full(num_groups, num_points)
    rows = np.arange(num_groups)
    for layer in range(k - 1, 0, -1):
        end = opt[layer][rows, end].astype(np.int64)
        bounds[:, layer] = end
    bounds[:, 0] = 0
    return bounds
