"""Limits of the target and of the build, each with where it comes from (DESIGN section 4)."""

# ANE compile stability ceiling seen in the field (CoreML-LLM, ANEMLL): ~15 layers per chunk.
ANE_MAX_LAYERS_PER_SHARD = 15
# Packages above ~1.0-1.4 GB have been seen to fall back off the ANE on iOS, silently.
ANE_MAX_PACKAGE_BYTES = 1_000_000_000
# Upper bound on SEQ_LEN (the shards' context capacity).
MAX_SEQ_LEN = 32768

# Bit widths the iOS18 constexpr ops store: constexpr_lut_to_dense indices, and
# constexpr_blockwise_shift_scale data (int4 / int8) for the embedding/head blocks.
LUT_BITS = (1, 2, 3, 4, 6, 8)
BLOCKWISE_BITS = (4, 8)
# GS128: a LUT per 128 output channels (every Qwen3 release's projections divide it).
DEFAULT_GROUP_SIZE = 128
