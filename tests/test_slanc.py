"""SLaNC pre-scales: an RMSNorm input that overflows fp16 stays finite and correct.

The norm is lowered through the real MIL path (graph.rmsnorm + MilOps, fp16), saved,
and run from disk with the evaluator, which rounds every op to fp16 as the device does."""
import numpy as np
import pytest
import coremltools as ct
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types

from qwen3build.graph import decoder as graph
from qwen3build.errors import BuildError
from qwen3build.evaluator import PackageEvaluator
from qwen3build.lower.mil import save
from qwen3build.lower.mil.ops import MilOps
from qwen3build.graph.slanc import FP16_SUMSQ_NORM_LIMIT, SAFETY_FACTOR, pow2_scale, validate_scales

HIDDEN = 256
EPS = 1e-6
# fp16 output vs the float64 RMSNorm: a few fp16 ulps.
MAX_ABS_ERROR = 1e-2


def norm_package(tmp_path, prescale, name):
    weight = np.linspace(0.5, 1.5, HIDDEN).astype(np.float16)

    @mb.program(input_specs=[mb.TensorSpec((1, HIDDEN), dtype=types.fp16)], opset_version=ct.target.iOS18)
    def program(x):
        return mb.identity(x=graph.rmsnorm(MilOps(), x, mb.const(val=weight), EPS, prescale), name="y")

    path = tmp_path / f"{name}.mlpackage"
    save.save_package(save.convert(program), path)
    return PackageEvaluator(path), weight.astype(np.float64)


def test_overflowing_input_is_finite_and_correct_with_the_prescale(tmp_path):
    rng = np.random.RandomState(0)
    x = (rng.randn(1, HIDDEN) * 300).astype(np.float16)   # ||x|| ~ 4800: sum of squares ~ 2.3e7 >> 65504
    x64 = x.astype(np.float64)
    expected = x64 / np.sqrt(np.mean(x64 ** 2) + EPS)
    plain, weight = norm_package(tmp_path, 1.0, "plain")
    y_plain = plain.predict({"x": x})["y"].astype(np.float64)
    assert not np.all(np.isfinite(y_plain)) or np.abs(y_plain).max() < 1e-3, "plain fp16 RMSNorm should break"
    scale = pow2_scale(float(np.linalg.norm(x64)))
    assert scale < 1 and SAFETY_FACTOR * scale * np.linalg.norm(x64) <= FP16_SUMSQ_NORM_LIMIT
    scaled, _ = norm_package(tmp_path, scale, "scaled")
    y = scaled.predict({"x": x})["y"].astype(np.float64)
    assert np.all(np.isfinite(y))
    assert np.abs(y - expected * weight).max() < MAX_ABS_ERROR


def test_prescale_leaves_ordinary_inputs_unchanged(tmp_path):
    x = np.random.RandomState(1).randn(1, HIDDEN).astype(np.float16)
    plain, _ = norm_package(tmp_path, 1.0, "plain")
    scaled, _ = norm_package(tmp_path, 2.0 ** -6, "scaled")  # exact power of two: no extra rounding
    np.testing.assert_allclose(plain.predict({"x": x})["y"], scaled.predict({"x": x})["y"], atol=2e-3)


def test_pow2_scale_is_a_power_of_two_never_above_one():
    for estimate in (0.1, 1.0, 255.0, 1e3, 1e6):
        scale = pow2_scale(estimate)
        assert scale <= 1.0 and np.log2(scale) == int(np.log2(scale))


def test_external_scales_are_validated():
    with pytest.raises(BuildError, match="shape"):
        validate_scales(np.ones((3, 4)), num_layers=4, where="SCALES=x.npy")
    with pytest.raises(BuildError, match="finite and positive"):
        validate_scales(np.zeros((5, 4)), num_layers=4, where="SCALES=x.npy")
    assert validate_scales(np.ones((5, 4)), num_layers=4, where="x").dtype == np.float32


def test_scales_setting_replaces_the_computed_table(workspace, tmp_path):
    external = np.full((5, 4), 0.25, np.float32)  # gqa fixture: 4 layers
    np.save(tmp_path / "scales.npy", external)
    workspace.doit("build", SCALES=str(tmp_path / "scales.npy"))
    np.testing.assert_array_equal(np.load(workspace.root / "artifacts/numerics/slanc_scales.npy"), external)
    np.save(tmp_path / "bad.npy", np.ones((2, 4), np.float32))
    result = workspace.doit("slanc", SCALES=str(tmp_path / "bad.npy"), check=False)
    assert result.returncode != 0
    assert "SCALES=" in result.stdout + result.stderr and "shape" in result.stdout + result.stderr
