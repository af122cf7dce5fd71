"""Core AI (.aimodel) packages: built in-process on tiny checkpoints by the real build body
(build/artifacts/aimodel.py) from the Core ML packages' own declarations plus the format
marker, run by Apple's Core AI runtime (coreai-core), checked against the torch reference
on the same packs, the numpy sampler rules and the packs' own dequantization; and
reproducible bytes across processes."""
from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from qwen3build.lower.coreai import coreai_available

if not coreai_available():
    pytest.skip("Core AI is not installed (the coreai extra: pip install -c constraints.txt -e '.[coreai]')",
                allow_module_level=True)

import torch  # noqa: E402

from qwen3build.build.actions import Builder  # noqa: E402
from qwen3build.build.artifacts import aimodel  # noqa: E402
from qwen3build.build.inputs import BuildInputs, DeclaredTensors, frozen  # noqa: E402
from qwen3build.build.keys import module_closure  # noqa: E402
from qwen3build.build.plan import make_plan  # noqa: E402
from qwen3build.checkpoint.tensors import layer_tensor_name  # noqa: E402
from qwen3build.errors import BuildError  # noqa: E402
from qwen3build.graph import sampler as sampling  # noqa: E402
from qwen3build.graph.sampler import GREEDY, SamplerSettings  # noqa: E402
from qwen3build.lower.coreai import convert, programs, require_coreai  # noqa: E402
from qwen3build.lower.coreai import sampler as coreai_sampler  # noqa: E402
from qwen3build.lower.coreai.weights import BlockwiseTable, LutWeight  # noqa: E402
from qwen3build.lower.torch.reference import ReferenceStack  # noqa: E402
from qwen3build.quant.blockwise import fit_blockwise  # noqa: E402
from qwen3build.quant.lut import fit_grouped_lut  # noqa: E402
from qwen3build.quant.packfile import save_pack  # noqa: E402
from qwen3build.quant.provider import PackedWeights  # noqa: E402
from qwen3build.runtime.coreai import AIModelPackage, CoreAIBackend  # noqa: E402

from conftest import REPO, DoitWorkspace, make_checkpoint  # noqa: E402

STEPS = 8
SEQ_LEN = 32
# fp16 packages vs the fp32 reference on the same packed values. Linux's Core AI runtime
# accumulates fp16 matmuls in fp16, one rounding per add (docs/coreai.md), so it drifts
# more than the Core ML evaluator (fp32 accumulation, 1e-2 in tests/test_packages.py):
# measured 0.5-1.8e-2 on the default checkpoint, less on these tiny shapes.
FP16_MAX_REL_LOGIT_ERROR = 3e-2
FP16_MIN_LOGIT_COSINE = 0.999
# The same modules in fp32: the lowering itself (graph, ops, packs, ring, state) against
# the reference, with only fp32 rounding in between.
FP32_MAX_REL_LOGIT_ERROR = 1e-5
# The sampler's effective temperature: the same fp32 ops, but the runtime sums the
# 151,936-term entropy one term after another (numpy pairwise): measured 2.6e-5.
EFFECTIVE_TEMPERATURE_RTOL = 1e-4
QWEN3_VOCAB = 151_936
HIGH_INDEX = 150_000  # > 65,535: 16-bit indices would wrap
LUT_SHAPE = (256, 48)
# A one-function package's program beside its weights: IR, LUTs, scales, headers.
PROGRAM_OVERHEAD_BYTES = 8_000

# LUT bits of the quantized stack (its LUT_DIR packs carry row scales).
ROW_SCALED_BITS = {"q_proj": 6, "k_proj": 8, "v_proj": 6, "o_proj": 4, "gate_proj": 4, "up_proj": 4, "down_proj": 4}
RECIPES = f"""
[recipes.fp16]
description = "fp16 weights everywhere"

[recipes.mixed]
projections = {{ {", ".join(f"{k} = {v}" for k, v in ROW_SCALED_BITS.items())} }}
embed_bits = 4

[recipes.lut4]
projections = {{ {", ".join(f"{k} = 4" for k in ROW_SCALED_BITS)} }}
embed_bits = 8
"""
# shape -> (checkpoint overrides, settings, LUT_DIR packs with row scales?)
STACKS = {
    "gqa": ({}, {}, False),                                              # head_dim 32 != 64 / 4
    "untied_mha": ({}, {}, False),                                       # untied head
    "mqa6": ({}, {"SHARDS": "a:0-0,b:1-3,c:4-4,d:5-5"}, False),          # one KV head, 4 shards
    "q128": ({"num_hidden_layers": 2}, {"RECIPE": "mixed"}, True),       # LUT 8/6/4 + row scales, int4 embedding
}
SLOW = pytest.mark.slow


# ------------------------------------------------------------------ building in-process

def coreai_inputs(builder: Builder, artifact: str, scratch: Path) -> BuildInputs:
    """What phase 2's aimodel:<artifact> declaration hands the build: the Core ML twin's
    declared values (less PALETTIZE_MASKS) with the format marker, tensors and upstream."""
    declared = builder.declarations.declare(artifact)
    values = {k: v for k, v in declared.values.items() if k != "PALETTIZE_MASKS"}
    values["format"] = aimodel.FORMAT
    upstream = {name: builder.cache.output_path(up.key, up.output) for name, up in declared.upstream.items()}
    scratch.mkdir(parents=True, exist_ok=True)
    return BuildInputs(artifact=f"aimodel:{artifact}", values=frozen(values),
                       tensors=DeclaredTensors(builder.plan.checkpoint, declared.tensors, f"aimodel:{artifact}"),
                       files={}, upstream=upstream, scratch=scratch)


def package_name(builder: Builder, artifact: str) -> str:
    kind, _, name = artifact.partition(":")
    return builder.plan.shard(name).package_name if kind == "shard" else artifact


def build_upstream(settings: dict) -> Builder:
    builder = Builder(make_plan(settings, environ={}))
    builder.weights()
    for artifact in ["slanc", *builder.plan.quant_ids()]:
        builder.ensure(artifact)
    return builder


def build_coreai_stack(builder: Builder, out_dir: Path) -> dict[str, Path]:
    """artifact id -> its .aimodel, built by aimodel.build."""
    built = {}
    for artifact in builder.plan.package_ids():
        package = package_name(builder, artifact)
        outputs = {f"{package}.aimodel": out_dir / f"{package}.aimodel", f"{package}.mlir": out_dir / f"{package}.mlir"}
        aimodel.build(coreai_inputs(builder, artifact, out_dir / ".scratch" / package), outputs)
        built[artifact] = outputs[f"{package}.aimodel"]
    return built


def packed_weights(builder: Builder) -> PackedWeights:
    """The build's packs, from its cache (what the reference computes with)."""
    plan, cache, declarations = builder.plan, builder.cache, builder.declarations

    def output(artifact, name):
        return cache.output_path(declarations.declare(artifact).key, name)

    layers = {layer: output(f"quant:layer{layer:02d}", f"layer{layer:02d}") for layer in plan.quantized_layers()}
    embed = output("quant:embed", "embed") if plan.recipe.embed_bits else None
    return PackedWeights(plan.checkpoint, plan.allocation, layers, embed, plan.config.tie_word_embeddings)


def reference_of(builder: Builder, prefill_len: int = 0) -> ReferenceStack:
    plan = builder.plan
    scales = np.load(builder.cache.output_path(builder.declarations.declare("slanc").key, "slanc_scales.npy"))
    return ReferenceStack(plan.checkpoint, packed_weights(builder), plan.config, plan.layout, scales,
                          plan.settings.SEQ_LEN, plan.settings.KV_WRITE, prefill_len=prefill_len)


def row_scaled_lut_dir(root: Path, plan) -> Path:
    """LUT_DIR packs with per-row scales (recipes never fit them; external packs may)."""
    for layer in range(plan.config.num_hidden_layers):
        (root / f"layer{layer:02d}").mkdir(parents=True)
        for kind, bits in ROW_SCALED_BITS.items():
            weight = plan.checkpoint.tensor(layer_tensor_name(layer, kind))
            save_pack(root / f"layer{layer:02d}" / f"{kind}.npz", fit_grouped_lut(weight, bits, 128, per_channel_scale=True))
    return root


_STACKS: dict = {}


@pytest.fixture(scope="module")
def stacks(tmp_path_factory):
    """shape -> (shape, Builder of its upstream artifacts, artifact id -> .aimodel), built
    on first use and kept for the module."""

    def get(shape):
        if shape not in _STACKS:
            overrides, settings_extra, row_scaled = STACKS[shape]
            root = tmp_path_factory.mktemp(f"coreai_{shape}")
            (root / "recipes.toml").write_text(RECIPES)
            ws = DoitWorkspace(root, make_checkpoint(root / "ckpt", shape, seed=11, **overrides))
            settings = {**ws.paths(), "SEQ_LEN": str(SEQ_LEN), "RECIPE_FILE": str(root / "recipes.toml"),
                        "PREFILL_LEN": "0", **settings_extra}
            if row_scaled:
                plan = make_plan(settings, environ={})
                settings["LUT_DIR"] = str(row_scaled_lut_dir(root / "luts", plan))
            builder = build_upstream(settings)
            _STACKS[shape] = shape, builder, build_coreai_stack(builder, root / "coreai")
        return _STACKS[shape]

    yield get
    _STACKS.clear()


@pytest.fixture(params=sorted(STACKS))
def stack(request, stacks):
    return stacks(request.param)


def open_backend(builder, packages) -> CoreAIBackend:
    shards = [packages[f"shard:{spec.name}"] for spec in builder.plan.layout]
    return CoreAIBackend(packages["io_model"], shards, packages["sampler_model"])


# ------------------------------------------------------------------ the stack

def test_coreai_stack_tracks_the_reference_and_greedy_matches_the_sampler_rules(stack):
    shape, builder, packages = stack
    reference = reference_of(builder)
    vocab = builder.plan.config.vocab_size
    tokens = np.random.RandomState(4).randint(0, vocab, STEPS)
    with open_backend(builder, packages) as backend:
        assert backend.window == sampling.DEFAULT_WINDOW and backend.prefill_len == 0
        for position, token in enumerate(tokens):
            logits = backend.forward(int(token), position)
            assert logits.shape == (1, vocab) and logits.dtype == np.float16
            got, expected = logits[0].astype(np.float32), reference.step(int(token), position)
            rel = np.abs(got - expected).max() / np.abs(expected).max()
            cosine = got @ expected / np.linalg.norm(got) / np.linalg.norm(expected)
            assert rel < FP16_MAX_REL_LOGIT_ERROR, f"{shape} step {position}: relative logit error {rel:.2e}"
            assert cosine > FP16_MIN_LOGIT_COSINE, f"{shape} step {position}: cosine {cosine:.6f}"
            window = sampling.recent_window(tokens[:position + 1], backend.window)
            assert backend.choose(logits, window, GREEDY, None) == sampling.sample(logits[0], window, GREEDY).token
        # The state holds exactly the written rows: slots S-1-p for p < STEPS, zeros elsewhere.
        for state in backend.state_arrays():
            kv = state[programs.STATE_NAME]
            assert np.count_nonzero(kv[:, :, : SEQ_LEN - STEPS]) == 0
            assert np.all(np.any(kv[:, :, SEQ_LEN - STEPS:] != 0, axis=-1))
        backend.reset()  # a reset starts from an empty ring: same logits as the first step
        first = backend.forward(int(tokens[0]), 0)[0].astype(np.float32)
    np.testing.assert_allclose(first, reference_of(builder).step(int(tokens[0]), 0),
                               atol=FP16_MAX_REL_LOGIT_ERROR * np.abs(first).max())


def test_packages_have_the_core_ml_interfaces_and_metadata(stack):
    shape, builder, packages = stack
    plan = builder.plan
    loop = asyncio.new_event_loop()
    try:
        io_model = AIModelPackage(packages["io_model"], loop)
        assert sorted(io_model.functions) == ["embed", "lm_head"]
        assert io_model.input_spec("embed", "input_ids") == ((1, 1), np.int32)
        assert io_model.input_spec("lm_head", "hidden_states") == ((1, 1, plan.config.hidden_size), np.float16)
        for spec in plan.layout:
            shard = AIModelPackage(packages[f"shard:{spec.name}"], loop)
            assert list(shard.functions) == [programs.DECODE]
            desc = shard.function("decode").desc
            assert desc.state_names == [programs.STATE_NAME]
            assert tuple(desc.state_descriptor(programs.STATE_NAME).shape) == programs.kv_state_shape(
                spec, plan.config, SEQ_LEN)
            shard.close()
        io_model.close()
    finally:
        loop.close()
    metadata = json.loads((packages[f"shard:{plan.layout[-1].name}"] / convert.METADATA_FILE).read_text())
    assert metadata["creationDate"] == convert.CREATION_DATE
    custom = metadata["creatorDefinedMetadata"]
    assert custom["qwen3build.role"] in ("exit", "entry+exit") and custom["qwen3build.seq_len"] == str(SEQ_LEN)
    # Quantized packages store the packs, not dense copies.
    if plan.recipe.embed_bits:
        dense_table = plan.config.vocab_size * plan.config.hidden_size * 2
        assert (packages["io_model"] / "main.mlirb").stat().st_size < 0.4 * dense_table
        text = (packages["io_model"].with_suffix(".mlir")).read_text()
        assert "constexpr_blockwise_shift_scale" in text or "blockwise_shift_scale" in text
    if plan.quantized_layers():
        assert "lut_to_dense" in packages[f"shard:{plan.layout[0].name}"].with_suffix(".mlir").read_text()


@pytest.mark.parametrize("shape", ["q128", pytest.param("mqa6", marks=SLOW), pytest.param("gqa", marks=SLOW),
                                   pytest.param("untied_mha", marks=SLOW)])
def test_fp32_lowering_matches_the_reference_exactly(stacks, shape):
    """The same modules in fp32 (not what ships): isolates the lowering from fp16 rounding."""
    shape, builder, _ = stacks(shape)
    plan = builder.plan
    reference = reference_of(builder)
    weights = packed_weights(builder)
    scales = reference.scales
    root = Path(builder.tree.cache_dir).parent / "fp32"
    root.mkdir(exist_ok=True)
    shard_paths = []
    for spec in plan.layout:
        module = programs.ShardModule(plan.checkpoint, weights, plan.config, spec, scales, SEQ_LEN,
                                      plan.settings.KV_WRITE, dtype=torch.float32).eval()
        path = root / f"{spec.package_name}.aimodel"
        convert.save_package(convert.convert(programs.shard_functions(module)), path, {})
        shard_paths.append(path)
    io_path = root / "io_model.aimodel"
    convert.save_package(convert.convert(programs.io_functions(weights, plan.config, torch.float32)), io_path, {})
    sampler_path = root / "sampler_model.aimodel"
    convert.save_package(convert.convert(coreai_sampler.sampler_functions(plan.config.vocab_size)), sampler_path, {})
    tokens = np.random.RandomState(5).randint(0, plan.config.vocab_size, STEPS)
    with CoreAIBackend(io_path, shard_paths, sampler_path) as backend:
        for position, token in enumerate(tokens):
            got = backend.forward(int(token), position)[0]
            expected = reference.step(int(token), position)
            rel = np.abs(got - expected).max() / np.abs(expected).max()
            assert rel < FP32_MAX_REL_LOGIT_ERROR, f"{shape} step {position}: relative logit error {rel:.2e}"


PREFILL_LEN = 8


def test_prefill_block_then_decode_track_the_reference(tmp_path):
    """PREFILL_LEN > 0: the packages hold the Core ML packages' functions; a partial block
    (padded with graph.PREFILL_PAD_ID) then decode steps on the same state."""
    from qwen3build.graph import decoder as graph

    (tmp_path / "recipes.toml").write_text(RECIPES)
    ws = DoitWorkspace(tmp_path, make_checkpoint(tmp_path / "ckpt", "q128", seed=4, num_hidden_layers=2))
    builder = build_upstream({**ws.paths(), "SEQ_LEN": str(SEQ_LEN), "RECIPE": "lut4", "SHARDS": "a:0-0,b:1-1",
                              "RECIPE_FILE": str(tmp_path / "recipes.toml"), "PREFILL_LEN": str(PREFILL_LEN)})
    packages = build_coreai_stack(builder, tmp_path / "coreai")
    plan = builder.plan
    reference = reference_of(builder, PREFILL_LEN)
    tokens = [int(t) for t in np.random.RandomState(6).randint(0, plan.config.vocab_size, PREFILL_LEN)]
    given = 5
    with open_backend(builder, packages) as backend:
        assert list(backend.io_model.functions) == list(graph.io_functions(PREFILL_LEN))
        assert all(list(shard.functions) == list(graph.shard_functions(PREFILL_LEN)) for shard in backend.shards)
        assert backend.prefill_len == PREFILL_LEN
        expected = reference.prefill(tokens[:given], 0)                              # (n, V)
        got = backend.prefill(tokens[:given], 0, logits="all").astype(np.float32)    # (n, V)
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() / np.abs(expected).max() < FP16_MAX_REL_LOGIT_ERROR
        for position in range(given, given + 2):  # decode continues on the block's state
            got = backend.forward(tokens[position], position)[0].astype(np.float32)
            expected = reference.step(tokens[position], position)
            assert np.abs(got - expected).max() / np.abs(expected).max() < FP16_MAX_REL_LOGIT_ERROR, position
        backend.reset()
        last = backend.prefill(tokens[:given], 0, logits="last")                     # (1, V)
    reference.reset()
    expected = reference.prefill(tokens[:given], 0)[-1]
    assert np.abs(last[0] - expected).max() / np.abs(expected).max() < FP16_MAX_REL_LOGIT_ERROR
    with CoreAIBackend(packages["io_model"], [], packages["sampler_model"], use_prefill=False) as backend:
        assert backend.prefill_len == 0
        with pytest.raises(BuildError, match="no prefill function"):
            backend.prefill(tokens[:given], 0)


# ------------------------------------------------------------------ quantized weights

def weight_package(tmp_path, module: torch.nn.Module, shape) -> tuple[np.ndarray, int]:
    """The dense value a one-function package computes from the weight module (+ zeros),
    and the size of its program (weights included)."""

    class Dense(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = module

        def forward(self, zeros):
            value = self.weight()
            value = getattr(value, "value", value)
            return value + zeros  # w + 0 == w exactly, in fp16 too

    example = (torch.zeros(shape, dtype=torch.float16),)
    path = tmp_path / "weight.aimodel"
    convert.save_package(convert.convert([convert.Function("main", Dense(), example, ("zeros",), ("weight",))]),
                         path, {})
    loop = asyncio.new_event_loop()
    try:
        package = AIModelPackage(path, loop)
        value = package.run(None, {"zeros": np.zeros(shape, np.float16)})["weight"]
        package.close()
    finally:
        loop.close()
    return value, (path / "main.mlirb").stat().st_size


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("row_scale", [False, True])
def test_lut_weights_dequantize_bit_for_bit(tmp_path, bits, row_scale):
    rng = np.random.default_rng(bits)
    weight = rng.normal(0, 0.02, LUT_SHAPE).astype(np.float32)  # two groups of 128 rows
    weight[3] *= 40  # an outlier row: its row scale differs from the others'
    pack = fit_grouped_lut(weight, bits, 128, per_channel_scale=row_scale)
    value, stored = weight_package(tmp_path, LutWeight(pack), LUT_SHAPE[::-1])
    assert value.dtype == np.float16
    np.testing.assert_array_equal(value, pack.dequantize_fp16().T)  # stored [in, out]
    assert stored < pack.indices.size * bits / 8 + PROGRAM_OVERHEAD_BYTES  # packed indices, no dense copy


@pytest.mark.parametrize("bits", [4, 8])
def test_blockwise_tables_dequantize_bit_for_bit(tmp_path, bits):
    weight = np.random.default_rng(bits).normal(0, 0.05, (300, 64)).astype(np.float32)
    pack = fit_blockwise(weight, bits=bits, block_size=32)
    value, stored = weight_package(tmp_path, BlockwiseTable(pack), (300, 64))
    np.testing.assert_array_equal(value, pack.dequantize_fp16())
    assert stored < pack.data.size * bits / 8 + pack.scale.nbytes + PROGRAM_OVERHEAD_BYTES


# ------------------------------------------------------------------ the sampler

@pytest.fixture(scope="module")
def qwen3_sampler(tmp_path_factory):
    """The sampler package at Qwen3's vocabulary, built by the build body."""
    out = tmp_path_factory.mktemp("coreai_sampler")
    values = {"format": aimodel.FORMAT, "vocab_size": QWEN3_VOCAB, "window": sampling.DEFAULT_WINDOW,
              "compute_units": "CPU_AND_GPU"}
    inputs = BuildInputs("aimodel:sampler_model", frozen(values), None, {}, {}, out / "scratch")
    outputs = {"sampler_model.aimodel": out / "sampler_model.aimodel", "sampler_model.mlir": out / "sampler_model.mlir"}
    aimodel.build(inputs, outputs)
    loop = asyncio.new_event_loop()
    package = AIModelPackage(outputs["sampler_model.aimodel"], loop)
    yield package, outputs["sampler_model.mlir"]
    package.close()
    loop.close()


def run_sampler(package, logits, window_ids, settings, noise):
    out = package.run(None, {"logits": np.asarray(logits, np.float16).reshape(1, -1), "recent_tokens": window_ids,
                             "noise": np.asarray(noise, np.float32).reshape(1, -1), **settings.inputs()})
    return int(out["token"].reshape(-1)[0]), float(out["effective_temperature"].reshape(-1)[0])


SAMPLER_CASES = [
    SamplerSettings(temperature=0.7, min_p=0.05, repetition_penalty=1.0, coherence=0.0),
    SamplerSettings(temperature=1.3, min_p=0.0, repetition_penalty=1.3, coherence=0.0),
    SamplerSettings(temperature=0.9, min_p=0.1, repetition_penalty=1.1, coherence=0.8),
    SamplerSettings(temperature=0.5, min_p=0.02, repetition_penalty=0.8, coherence=1.0),
    GREEDY,
    SamplerSettings(temperature=0.0, min_p=0.5, repetition_penalty=1.5, coherence=0.5),
]


@pytest.mark.parametrize("case", range(len(SAMPLER_CASES)))
def test_sampler_tokens_equal_the_numpy_rules(qwen3_sampler, case):
    package, _ = qwen3_sampler
    settings = SAMPLER_CASES[case]
    rng = np.random.default_rng(case)
    logits = (rng.standard_normal(QWEN3_VOCAB) * 3).astype(np.float16)
    logits[HIGH_INDEX] = 12  # the likely token sits above 65,535
    history = [HIGH_INDEX, 17, 17, 70_000, -1, QWEN3_VOCAB + 5][: 2 + case]
    window = sampling.recent_window(history, sampling.DEFAULT_WINDOW)
    for draw in range(3):
        noise = sampling.uniform_noise(rng, QWEN3_VOCAB)
        token, t_eff = run_sampler(package, logits, window, settings, noise)
        expected = sampling.sample(logits, window, settings, None if settings.greedy else noise)
        assert token == expected.token, (case, draw)
        assert t_eff == pytest.approx(expected.effective_temperature, rel=EFFECTIVE_TEMPERATURE_RTOL)


def test_sampler_is_fp32_int32_and_random_free(qwen3_sampler):
    _, ir = qwen3_sampler
    text = ir.read_text()
    assert "i64" not in text and "f64" not in text
    assert "random" not in text and "sort" not in text
    noise_input = next(line for line in text.splitlines() if "coreai.graph @main" in line)
    assert f"tensor<1x{QWEN3_VOCAB}xf32>" in noise_input and f"tensor<1x{QWEN3_VOCAB}xf16>" in noise_input


def test_sampler_greedy_picks_an_index_above_65535(qwen3_sampler):
    package, _ = qwen3_sampler
    logits = np.zeros(QWEN3_VOCAB, np.float16)
    logits[HIGH_INDEX] = 30
    token, t_eff = run_sampler(package, logits, sampling.recent_window([], sampling.DEFAULT_WINDOW), GREEDY,
                               np.full(QWEN3_VOCAB, 0.5))
    assert (token, t_eff) == (HIGH_INDEX, 0.0)


# ------------------------------------------------------------------ bytes and keys

BUILD_IN_FRESH_PROCESS = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, sys.argv[3])
    from test_coreai import build_upstream, build_coreai_stack
    from pathlib import Path
    builder = build_upstream(json.loads(sys.argv[1]))
    build_coreai_stack(builder, Path(sys.argv[2]))
''')


def test_two_fresh_processes_build_identical_packages(tmp_path):
    """Every file of every package (main.mlirb, main.hash, metadata.json) and IR text."""
    config = make_checkpoint(tmp_path / "ckpt", "q128", seed=2, num_hidden_layers=2)
    (tmp_path / "recipes.toml").write_text(RECIPES)
    runs = []
    for name in ("one", "two"):
        ws = DoitWorkspace(tmp_path / name, config)
        settings = {**ws.paths(), "SEQ_LEN": str(SEQ_LEN), "RECIPE": "lut4", "RECIPE_FILE": str(tmp_path / "recipes.toml"),
                    "PREFILL_LEN": "0"}
        runs.append(subprocess.Popen([sys.executable, "-c", BUILD_IN_FRESH_PROCESS, json.dumps(settings),
                                      str(tmp_path / name / "coreai"), str(REPO / "tests")], cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for run in runs:
        _, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr

    def files(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file() and ".scratch" not in p.parts}

    one, two = files(tmp_path / "one" / "coreai"), files(tmp_path / "two" / "coreai")
    assert sorted(one) == sorted(two)
    assert any(name.endswith("main.mlirb") for name in one) and any(name.endswith(".mlir") for name in one)
    assert not [name for name in one if one[name] != two[name]]


def test_every_module_the_build_runs_is_in_its_code_closure(tmp_path):
    """The aimodel build's key covers its code: trace one build of each kind."""
    import qwen3build

    ws = DoitWorkspace(tmp_path, make_checkpoint(tmp_path / "ckpt", "gqa", seed=3))
    builder = build_upstream({**ws.paths(), "SEQ_LEN": "16", "PREFILL_LEN": "0"})
    package_dir = str(Path(qwen3build.__file__).parent) + "/"
    closure = set(module_closure("qwen3build.build.artifacts.aimodel")) | set(module_closure("qwen3build.build.inputs"))
    for artifact in ("shard:left", "io_model", "sampler_model"):
        package = package_name(builder, artifact)
        outputs = {f"{package}.aimodel": tmp_path / f"{package}.aimodel", f"{package}.mlir": tmp_path / f"{package}.mlir"}
        inputs = coreai_inputs(builder, artifact, tmp_path / "scratch")
        seen = set()

        def profile(frame, event, arg):
            if event == "call":
                seen.add(frame.f_code.co_filename)

        logging.disable(logging.CRITICAL)  # handlers earlier tests installed format records, not bytes
        sys.setprofile(profile)
        try:
            aimodel.build(inputs, outputs)
        finally:
            sys.setprofile(None)
            logging.disable(logging.NOTSET)
        ran = {"qwen3build." + f[len(package_dir):-3].replace("/", ".").removesuffix(".__init__")
               for f in seen if f.startswith(package_dir) and f.endswith(".py")}
        assert "qwen3build.graph.decoder" in ran or artifact == "sampler_model"
        assert not ran - closure, f"{artifact}: ran {sorted(ran - closure)} outside its key"
    assert not {m for m in closure if m.startswith(("qwen3build.runtime", "qwen3build.verify", "qwen3build.build.declare"))}


def test_the_build_refuses_values_without_the_format_marker(tmp_path):
    inputs = BuildInputs("aimodel:sampler_model", frozen({"vocab_size": 8, "window": 4, "compute_units": "ALL"}),
                         None, {}, {}, tmp_path)
    with pytest.raises(ValueError, match="format"):
        aimodel.build(inputs, {})


def test_missing_coreai_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "coreai_torch", None)  # `import coreai_torch` now raises ImportError
    with pytest.raises(BuildError) as error:
        require_coreai("FORMATS=coreai")
    message = str(error.value)
    assert "\n" not in message and ".[coreai]" in message and message.startswith("FORMATS=coreai")


def test_compute_unit_choice_is_refused_off_macos(qwen3_sampler):
    if sys.platform == "darwin":
        pytest.skip("Linux only")
    package, _ = qwen3_sampler
    with pytest.raises(BuildError, match="macOS 27"):
        CoreAIBackend(package.path, [], package.path, compute_unit="neural_engine")
    with pytest.raises(BuildError, match="allowed"):
        CoreAIBackend(package.path, [], package.path, compute_unit="ane")
    with pytest.raises(BuildError, match="not a Core AI package"):
        CoreAIBackend(package.path.parent, [], package.path)
