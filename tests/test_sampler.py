"""The sampler package as shipped: saved at Qwen3's vocabulary, evaluated from its bytes,
checked against the plain numpy rules in qwen3build/sampling.py."""
import math

import numpy as np
import pytest
from coremltools.converters.mil.mil import types as mil_types

from qwen3build.graph import sampler as sampling
from qwen3build.errors import BuildError
from qwen3build.evaluator import PackageEvaluator, load_function, read_interface
from qwen3build.lower.mil import save
from qwen3build.lower.mil.sampler import INPUT_NAMES, OUTPUT_NAMES, convert, sampler_metadata, sampler_program
from qwen3build.graph.sampler import GREEDY, SamplerSettings

QWEN3_VOCAB = 151_936  # > 65,536: 16-bit indices would wrap (150000 -> 18928)
WINDOW = sampling.DEFAULT_WINDOW
HIGH_INDEX = 150_000
RANDOM_CASES = 6
# The package and the numpy rules compute the same fp32 ops in the same order.
EFFECTIVE_TEMPERATURE_RTOL = 1e-5
# Gumbel-max frequency check (numpy only): draws, and the allowed |freq - p| per token.
FREQUENCY_DRAWS = 20_000
FREQUENCY_TOLERANCE = 0.015


@pytest.fixture(scope="module")
def sampler_package(tmp_path_factory):
    path = tmp_path_factory.mktemp("sampler") / "sampler_model.mlpackage"
    save.save_package(convert(sampler_program(QWEN3_VOCAB, WINDOW), sampler_metadata(QWEN3_VOCAB, WINDOW, "CPU_AND_GPU")), path)
    return path


@pytest.fixture(scope="module")
def sampler(sampler_package):
    return PackageEvaluator(sampler_package)


def run_package(sampler, logits, window_ids, settings, noise=None):
    noise = np.full((1, QWEN3_VOCAB), 0.5, np.float32) if noise is None else noise
    out = sampler.predict({"logits": np.asarray(logits, np.float16).reshape(1, -1),
                           "recent_tokens": window_ids, "noise": noise.reshape(1, -1), **settings.inputs()})
    return int(out["token"][0]), float(out["effective_temperature"][0])


def random_logits(rng, scale=3.0):
    return (rng.standard_normal(QWEN3_VOCAB) * scale).astype(np.float16)


def no_window():
    return sampling.recent_window([], WINDOW)


def noise_favoring(token, rest=0.5):
    """Uniform noise whose Gumbel draw is largest at `token` (g = 16.6 vs 0.37 elsewhere)."""
    noise = np.full(QWEN3_VOCAB, rest, np.float32)
    noise[token] = sampling.NOISE_MAX
    return noise


# ------------------------------------------------------------------ the package's surface

def test_interface_names_dtypes_and_shapes(sampler_package):
    interface = read_interface(sampler_package)
    assert tuple(interface.inputs) == INPUT_NAMES
    assert interface.inputs["logits"] == ((1, QWEN3_VOCAB), np.float16)
    assert interface.inputs["recent_tokens"] == ((1, WINDOW), np.int32)
    assert interface.inputs["noise"] == ((1, QWEN3_VOCAB), np.float32)
    for name in ("temperature", "min_p", "repetition_penalty", "coherence"):
        assert interface.inputs[name] == ((1,), np.float32), name
    assert tuple(interface.outputs) == OUTPUT_NAMES
    assert interface.outputs["token"] == ((1,), np.int32)
    assert interface.outputs["effective_temperature"] == ((1,), np.float32)


def test_computes_in_fp32_with_int32_indices_and_no_random_ops(sampler_package):
    operations = load_function(sampler_package).function.operations
    types = [op.op_type for op in operations]
    assert not [t for t in types if t.startswith("random")], types
    casts = [op for op in operations if op.op_type == "cast"]
    assert [op.outputs[0].dtype.__name__ for op in casts] == ["fp32"]  # the fp16 logits, once; no int16 index
    fp16_ops = [op.op_type for op in operations if op.op_type != "const"
                and any(getattr(v.dtype, "__name__", "") == "fp16" for v in op.outputs)]
    assert fp16_ops == [], fp16_ops
    indices = [op for op in operations if op.op_type in ("gather_along_axis", "scatter_along_axis")]
    assert len(indices) == 2 and all(mil_types.builtin_to_string(op.indices.dtype) == "int32" for op in indices)


def test_work_per_token_is_linear_in_vocab_plus_window(sampler_package):
    """No value of V x W elements (the old (1, W, V + 1) one-hot): every op's output holds
    at most V + 1 elements, and the window is touched by one gather and one scatter."""
    operations = load_function(sampler_package).function.operations
    sizes = {op.name: max(math.prod(v.shape) for v in op.outputs) for op in operations if op.op_type != "const"}
    assert max(sizes.values()) <= QWEN3_VOCAB + 1, max(sizes.items(), key=lambda item: item[1])
    assert not [op for op in operations if op.op_type == "one_hot"]


# ------------------------------------------------------------------ same token as the numpy rules

@pytest.mark.parametrize("case", range(RANDOM_CASES))
def test_fixed_noise_gives_the_numpy_token(sampler, case):
    rng = np.random.default_rng(100 + case)
    logits = random_logits(rng)
    window = sampling.recent_window(rng.integers(0, QWEN3_VOCAB, rng.integers(0, 2 * WINDOW)), WINDOW)
    window[0, : case * 4] = window[0, -1]  # some cases repeat an id (or padding) in the window
    settings = SamplerSettings(temperature=float(rng.uniform(0.3, 1.5)), min_p=float(rng.choice([0.0, 0.02, 0.2])),
                               repetition_penalty=float(rng.choice([1.0, 1.3, 0.8])),
                               coherence=float(rng.choice([0.0, 0.5, 1.0])))
    noise = sampling.uniform_noise(rng, QWEN3_VOCAB)
    token, t_eff = run_package(sampler, logits, window, settings, noise)
    expected = sampling.sample(logits, window, settings, noise)
    assert token == expected.token, settings
    assert t_eff == pytest.approx(expected.effective_temperature, rel=EFFECTIVE_TEMPERATURE_RTOL)


def test_same_noise_same_token_other_noise_other_tokens(sampler):
    logits = np.zeros(QWEN3_VOCAB, np.float16)  # flat: every draw is decided by the noise
    settings = SamplerSettings(temperature=1.0, min_p=0.0)
    draws = [sampling.uniform_noise(np.random.default_rng(seed), QWEN3_VOCAB) for seed in (1, 1, 2)]
    tokens = [run_package(sampler, logits, no_window(), settings, noise)[0] for noise in draws]
    assert tokens[0] == tokens[1] != tokens[2]
    assert tokens == [sampling.sample(logits, no_window(), settings, n).token for n in draws]


# ------------------------------------------------------------------ greedy

def test_temperature_zero_is_argmax_whatever_the_noise_and_min_p(sampler):
    rng = np.random.default_rng(3)
    for _ in range(3):
        logits = random_logits(rng)
        settings = SamplerSettings(temperature=0.0, min_p=float(rng.uniform()), coherence=float(rng.uniform()))
        token, t_eff = run_package(sampler, logits, no_window(), settings, sampling.uniform_noise(rng, QWEN3_VOCAB))
        assert token == int(np.argmax(logits))
        assert t_eff == 0.0


def test_index_150000_comes_back(sampler):
    logits = np.zeros(QWEN3_VOCAB, np.float16)
    logits[HIGH_INDEX] = 5.0
    assert run_package(sampler, logits, no_window(), GREEDY)[0] == HIGH_INDEX
    # Sampling with min-p 1: only the top token survives, even against noise that favors another.
    only_top = SamplerSettings(temperature=1.0, min_p=1.0)
    assert run_package(sampler, logits, no_window(), only_top, noise_favoring(HIGH_INDEX + 1))[0] == HIGH_INDEX
    # And a high index in the window is penalized (the one-hot reaches it): 5 / 10 < 1.
    logits[HIGH_INDEX - 1] = 1.0
    penalized = SamplerSettings(temperature=0.0, min_p=0.0, repetition_penalty=10.0)
    assert run_package(sampler, logits, sampling.recent_window([HIGH_INDEX], WINDOW), penalized)[0] == HIGH_INDEX - 1


# ------------------------------------------------------------------ min-p

def test_min_p_prunes_exactly_below_the_threshold(sampler):
    min_p, temperature = 0.1, 1.0
    threshold = math.log(min_p)  # survivors: logit - max >= log(min_p)
    logits = np.full(QWEN3_VOCAB, -20.0, np.float16)
    logits[0] = 4.0
    offsets = [-0.5, -1.5, -2.25, -2.35, -3.0, -8.0]          # relative to the max
    candidates = list(range(1, 1 + len(offsets)))
    for token, offset in zip(candidates, offsets):
        logits[token] = 4.0 + offset
    settings = SamplerSettings(temperature=temperature, min_p=min_p)
    keep = sampling.min_p_keep(logits.astype(np.float32) / temperature, min_p)
    assert [bool(keep[t]) for t in candidates] == [o >= threshold for o in offsets]
    for token in candidates:
        chosen = run_package(sampler, logits, no_window(), settings, noise_favoring(token))[0]
        # A survivor with the largest Gumbel draw wins; a pruned one can never be chosen.
        assert chosen == (token if keep[token] else 0), (token, chosen)


def test_min_p_zero_keeps_everything(sampler):
    logits = np.zeros(QWEN3_VOCAB, np.float16)
    logits[0] = 10.0  # p(others) / p(top) = exp(-10) = 4.5e-5
    noise = noise_favoring(12345, rest=0.0)  # clipped to NOISE_MIN: g = -2.8; g(12345) = 16.6
    assert run_package(sampler, logits, no_window(), SamplerSettings(temperature=1.0, min_p=0.0), noise)[0] == 12345
    assert run_package(sampler, logits, no_window(), SamplerSettings(temperature=1.0, min_p=1e-3), noise)[0] == 0


# ------------------------------------------------------------------ repetition penalty

def test_penalty_lowers_a_repeated_positive_logit(sampler):
    logits = np.zeros(QWEN3_VOCAB, np.float16)
    logits[[10, 20]] = [3.0, 2.5]
    penalty = SamplerSettings(temperature=0.0, min_p=0.0, repetition_penalty=1.3)
    assert run_package(sampler, logits, no_window(), penalty)[0] == 10
    assert run_package(sampler, logits, sampling.recent_window([10], WINDOW), penalty)[0] == 20  # 3 / 1.3 < 2.5


def test_penalty_lowers_a_repeated_negative_logit(sampler):
    logits = np.full(QWEN3_VOCAB, -9.0, np.float16)
    logits[[10, 20]] = [-1.0, -1.1]
    penalty = SamplerSettings(temperature=0.0, min_p=0.0, repetition_penalty=1.3)
    assert run_package(sampler, logits, no_window(), penalty)[0] == 10
    assert run_package(sampler, logits, sampling.recent_window([10], WINDOW), penalty)[0] == 20  # -1.3 < -1.1


def test_penalty_lowers_the_sampled_odds(sampler):
    """With noise drawn so that token 10 wins unpenalized, the penalty moves the draw away."""
    logits = np.zeros(QWEN3_VOCAB, np.float16)
    logits[[10, 20]] = [4.0, 3.0]
    noise = np.full(QWEN3_VOCAB, 1e-6, np.float32)  # g = -2.6: only 10 and 20 are in the race
    noise[[10, 20]] = 0.5
    settings = SamplerSettings(temperature=1.0, min_p=0.0, repetition_penalty=2.0)
    assert run_package(sampler, logits, no_window(), settings, noise)[0] == 10
    assert run_package(sampler, logits, sampling.recent_window([10], WINDOW), settings, noise)[0] == 20


def test_padding_and_out_of_range_window_ids_are_ignored(sampler):
    logits = np.zeros(QWEN3_VOCAB, np.float16)
    logits[[0, QWEN3_VOCAB - 1]] = [3.0, 2.9]
    window = np.full((1, WINDOW), sampling.PADDING_TOKEN, np.int32)
    window[0, :3] = [-7, QWEN3_VOCAB, QWEN3_VOCAB + 5]
    penalty = SamplerSettings(temperature=0.0, min_p=0.0, repetition_penalty=5.0)
    assert run_package(sampler, logits, window, penalty)[0] == 0
    assert sampling.window_mask(window, QWEN3_VOCAB).sum() == 0


def test_a_repeated_id_is_penalized_once(sampler):
    """Duplicates in the window (mixed with padding and out-of-range ids) penalize a token
    once: penalized twice, token 10 would fall below token 20 in both cases."""
    window = np.full((1, WINDOW), sampling.PADDING_TOKEN, np.int32)
    window[0, -12:] = [10, -3, 10, QWEN3_VOCAB, 10, 10, 7, 10, QWEN3_VOCAB + 9, 10, 7, 10]
    penalty = SamplerSettings(temperature=0.0, min_p=0.0, repetition_penalty=1.3)
    for value_10, value_20 in ((3.0, 2.0), (-1.0, -1.5)):   # once: 2.31 > 2.0, -1.3 > -1.5
        logits = np.full(QWEN3_VOCAB, -9.0, np.float16)
        logits[[10, 20]] = [value_10, value_20]
        assert run_package(sampler, logits, window, penalty)[0] == 10, (value_10, value_20)
        assert sampling.sample(logits, window, penalty).token == 10


@pytest.mark.parametrize("case", range(RANDOM_CASES))
def test_penalize_equals_the_per_token_definition(case):
    """The O(V + W) gather / write-back gives exactly the rule's definition: every id in
    the window (padding and out-of-range ignored, duplicates once) penalized, the rest kept."""
    rng = np.random.default_rng(200 + case)
    vocab = 1000
    logits = (rng.standard_normal(vocab) * 3).astype(np.float32)
    window = rng.integers(-5, vocab + 5, (1, WINDOW)).astype(np.int32)
    window[0, : WINDOW // 4] = window[0, -1]                 # duplicates
    penalty = float(rng.uniform(0.5, 2.0))
    p = np.float32(penalty)
    expected = np.where(sampling.window_mask(window, vocab), np.where(logits > 0, logits / p, logits * p), logits)
    np.testing.assert_array_equal(sampling.penalize(logits, window, penalty), expected.astype(np.float32))


# ------------------------------------------------------------------ coherence modulation

def test_effective_temperature_follows_the_normalized_entropy(sampler):
    temperature, coherence = 0.8, 0.75
    flat = np.zeros(QWEN3_VOCAB, np.float16)                 # H = log V
    peaked = np.full(QWEN3_VOCAB, -60.0, np.float16)
    peaked[5] = 0.0                                          # H ~ 0
    settings = SamplerSettings(temperature=temperature, min_p=0.0, coherence=coherence)
    assert run_package(sampler, flat, no_window(), settings)[1] == pytest.approx(temperature, rel=1e-4)
    assert run_package(sampler, peaked, no_window(), settings)[1] == pytest.approx(temperature * (1 - coherence),
                                                                                   rel=1e-4)
    rng = np.random.default_rng(11)
    logits = random_logits(rng, scale=4.0)
    hn = sampling.normalized_entropy(logits.astype(np.float32))
    assert 0.05 < hn < 0.95
    assert run_package(sampler, logits, no_window(), settings)[1] == pytest.approx(
        temperature * (1 - coherence * (1 - hn)), rel=EFFECTIVE_TEMPERATURE_RTOL)


def test_coherence_keeps_a_confident_step_on_its_top_token(sampler):
    """A confident step whose noise would pick the runner-up at the plain temperature is
    sampled at a lower temperature under coherence modulation, and keeps its top token."""
    logits = np.full(QWEN3_VOCAB, -30.0, np.float16)
    logits[[10, 20]] = [2.0, 0.0]
    noise = np.full(QWEN3_VOCAB, 1e-6, np.float32)
    noise[10], noise[20] = 0.2, 0.9  # g10 = -0.48, g20 = 2.25: the runner-up wins at T = 1
    plain = SamplerSettings(temperature=1.0, min_p=0.0, coherence=0.0)
    modulated = SamplerSettings(temperature=1.0, min_p=0.0, coherence=1.0)
    assert run_package(sampler, logits, no_window(), plain, noise)[0] == 20
    token, t_eff = run_package(sampler, logits, no_window(), modulated, noise)
    assert t_eff < 0.05 and token == 10
    assert token == sampling.sample(logits, no_window(), modulated, noise).token


# ------------------------------------------------------------------ the numpy rules themselves

def test_gumbel_max_draws_from_the_softmax_of_the_survivors():
    logits = np.array([2.0, 1.0, 0.5, -3.0, 0.0], np.float32)
    settings = SamplerSettings(temperature=0.7, min_p=0.05)
    rng = np.random.default_rng(0)
    counts = np.bincount([sampling.sample(logits, [], settings, sampling.uniform_noise(rng, 5)).token
                          for _ in range(FREQUENCY_DRAWS)], minlength=5) / FREQUENCY_DRAWS
    scaled = logits / settings.temperature
    keep = sampling.min_p_keep(scaled, settings.min_p)
    probs = np.where(keep, np.exp(scaled - scaled.max()), 0)
    probs /= probs.sum()
    assert keep.tolist() == [True, True, True, False, True]
    np.testing.assert_allclose(counts, probs, atol=FREQUENCY_TOLERANCE)


def test_recent_window_keeps_the_last_ids_left_padded():
    assert sampling.recent_window([1, 2, 3], 5).tolist() == [[-1, -1, 1, 2, 3]]
    assert sampling.recent_window(range(10), 4).tolist() == [[6, 7, 8, 9]]


@pytest.mark.parametrize("field, value", [("temperature", -0.1), ("min_p", 1.5), ("repetition_penalty", 0.0),
                                          ("coherence", 2.0), ("temperature", float("nan"))])
def test_settings_out_of_range_are_one_line_errors(field, value):
    with pytest.raises(BuildError, match=field):
        SamplerSettings(**{field: value})
