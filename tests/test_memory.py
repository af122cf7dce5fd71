"""Memory grows with the model at a rate that keeps every build task of the Qwen3-1.7B
shape under 4 GB (issue: real size on a laptop budget).

Each build task of a scaled-down checkpoint (the 1.7B shape's proportions, narrower) runs
its build body in this process under tracemalloc, which counts every numpy buffer and
Python object the body allocates (not the interpreter or libraries already loaded, which
a per-task RSS figure mixes in). Its peak must stay within a budget proportional to the
fp32 bytes of the weights the task scales with: the table for quant:embed, slanc and the
io_model; the shard's layers for a shard; one layer for a layer's packs. The factors are
what keeps the 1.7B shape under TASK_LIMIT_BYTES with BASE_BYTES for the process itself,
so a change that makes a task hold, say, two fp32 copies of the embedding fails here
before anyone builds 1.7B. bench/scale.py measures the real peaks at 1.7B (README).
"""
import tracemalloc

import pytest

from qwen3build.build.actions import Builder
from qwen3build.build.plan import make_plan

from conftest import DoitWorkspace, make_checkpoint

GB = 1e9
TASK_LIMIT_BYTES = 4 * GB
# A build worker's own resident bytes before a body runs (python, numpy, torch,
# coremltools imported): measured 0.35-0.45 GB here; 0.5 GB with headroom.
BASE_BYTES = 0.5 * GB
# The 1.7B shape (bench/make_qwen3_1p7b_checkpoint.py): fp32 bytes each task scales with.
QWEN3_1P7B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128)
# Its preset layout's largest shard: layers 0-10.
QWEN3_1P7B_LARGEST_SHARD_LAYERS = 11
# Scaled down: 1.7B's head and FFN proportions at a quarter of the width and a fifth of the
# vocabulary (tables of 20 MB, layers of 3 MB in fp32), untied so the io_model holds two.
SCALED = dict(vocab_size=30720, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=128, tie_word_embeddings=False)
SEQ_LEN = 256
# Bytes a body allocates whatever the model's size (MIL program objects, converter
# bookkeeping, the state tables at SEQ_LEN): measured up to ~40 MB on this shape.
FIXED_ALLOWANCE_BYTES = 64e6


def layer_fp32_bytes(shape: dict) -> int:
    hidden, q_dim = shape["hidden_size"], shape["num_attention_heads"] * shape["head_dim"]
    kv_dim = shape["num_key_value_heads"] * shape["head_dim"]
    return 4 * (hidden * (2 * q_dim + 2 * kv_dim) + 3 * hidden * shape["intermediate_size"])


def table_fp32_bytes(shape: dict) -> int:
    return 4 * shape["vocab_size"] * shape["hidden_size"]


def budget_factor(scaled_bytes_1p7b: float) -> float:
    """Peak bytes per scaling byte that keep the 1.7B task under TASK_LIMIT_BYTES."""
    return (TASK_LIMIT_BYTES - BASE_BYTES) / scaled_bytes_1p7b


def scaling_bytes(artifact: str, builder, shape: dict) -> tuple[float, float]:
    """(bytes this task scales with on `shape`, the same at 1.7B)."""
    if artifact in ("quant:embed", "slanc"):
        return table_fp32_bytes(shape), table_fp32_bytes(QWEN3_1P7B)
    if artifact == "io_model":  # per table it holds: two here (untied), one at 1.7B (tied)
        return 2 * table_fp32_bytes(shape), table_fp32_bytes(QWEN3_1P7B)
    if artifact.startswith("quant:layer"):
        return layer_fp32_bytes(shape), layer_fp32_bytes(QWEN3_1P7B)
    spec = next(s for s in builder.plan.layout if f"shard:{s.name}" == artifact)
    return (len(spec.layers) * layer_fp32_bytes(shape),
            QWEN3_1P7B_LARGEST_SHARD_LAYERS * layer_fp32_bytes(QWEN3_1P7B))


@pytest.fixture(scope="module")
def builders(tmp_path_factory):
    """recipe -> a Builder of the scaled checkpoint (made on first use)."""
    root = tmp_path_factory.mktemp("memory")
    config = make_checkpoint(root / "ckpt", "gqa", **SCALED, max_position_embeddings=4096)
    made = {}

    def get(recipe: str) -> Builder:
        if recipe not in made:
            ws = DoitWorkspace(root / recipe, config)
            made[recipe] = Builder(make_plan({**ws.paths(), "SEQ_LEN": str(SEQ_LEN), "RECIPE": recipe}, environ={}))
            made[recipe].weights()
        return made[recipe]
    return get


def traced_peak(builder, artifact: str) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        builder.ensure(artifact)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("recipe,artifact", [
    ("default", "quant:embed"), ("default", "quant:layer00"), ("default", "slanc"), ("default", "io_model"),
    ("default", "shard:left"), ("fp16", "io_model"), ("fp16", "shard:left")])
def test_every_task_peak_scales_within_the_1p7b_budget(builders, recipe, artifact):
    builder = builders(recipe)
    for upstream in builder.plan.upstream_ids(artifact):
        builder.ensure(upstream)
    peak = traced_peak(builder, artifact)
    here, at_1p7b = scaling_bytes(artifact, builder, SCALED)
    limit = FIXED_ALLOWANCE_BYTES + budget_factor(at_1p7b) * here
    assert peak <= limit, (f"{artifact} ({recipe}): peak {peak / 1e6:.1f} MB > {limit / 1e6:.1f} MB "
                           f"({peak / here:.2f} x its {here / 1e6:.1f} MB of fp32 weights; at 1.7B that is "
                           f"{(BASE_BYTES + peak / here * at_1p7b) / GB:.2f} GB)")
