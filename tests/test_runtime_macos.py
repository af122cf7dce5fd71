"""qwen3build.runtime: backend selection, and Core ML against the evaluator on macOS."""

from __future__ import annotations

import sys

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

from qwen3build.runtime import packages as runtime  # noqa: E402

IOS18 = ct.target.iOS18
on_macos = pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction needs macOS")
not_on_macos = pytest.mark.skipif(sys.platform == "darwin", reason="checks the non-macOS refusal")
# Core ML may run fp16 ops on GPU/ANE with different accumulation order than the evaluator.
COREML_VS_EVALUATOR_ATOL = 1e-2
CACHE_SHAPE = (1, 2, 4, 3)


@pytest.fixture
def stateful_package(tmp_path):
    """A masked-blend cache write plus a matmul that reads the written cache."""
    weight = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float16)

    @mb.program(
        input_specs=[
            mb.TensorSpec((1, 2, 1, 3), dtype=types.fp16),
            mb.TensorSpec((1, 1, 4, 1), dtype=types.fp16),
            mb.StateTensorSpec(CACHE_SHAPE, dtype=types.fp16),
        ],
        opset_version=IOS18,
    )
    def program(new_row, row_mask, cache):
        old = mb.read_state(input=cache)
        blended = mb.add(x=mb.mul(x=old, y=mb.sub(x=np.float16(1), y=row_mask)), y=mb.mul(x=new_row, y=row_mask))
        written = mb.coreml_update_state(state=cache, value=blended)
        return mb.linear(x=written, weight=weight, name="projected")

    model = ct.convert(
        program,
        convert_to="mlprogram",
        minimum_deployment_target=IOS18,
        skip_model_load=True,
        compute_units=ct.ComputeUnit.CPU_ONLY,
    )
    path = tmp_path / "stateful.mlpackage"
    model.save(str(path))
    return path


def _steps():
    rng = np.random.default_rng(1)
    for position in (3, 2, 1):
        mask = np.zeros((1, 1, 4, 1), np.float16)
        mask[0, 0, position, 0] = 1
        yield {"new_row": rng.standard_normal((1, 2, 1, 3)).astype(np.float16), "row_mask": mask}


def test_unknown_backend_names_the_allowed_ones(stateful_package):
    with pytest.raises(ValueError, match="not one of"):
        runtime.open_package(stateful_package, backend="ane")


def test_evaluator_backend_everywhere(stateful_package):
    model = runtime.open_package(stateful_package, backend="evaluator")
    assert model.backend == "evaluator"
    assert "evaluator" in runtime.available_backends()
    state = model.new_state()
    for inputs in _steps():
        out = model.predict(inputs, state)
    assert out["projected"].shape == (1, 2, 4, 5)
    assert model.state_arrays(state)["cache"][:, :, 1:].any()


@not_on_macos
def test_coreml_backend_refused_off_macos_in_one_line(stateful_package):
    assert runtime.available_backends() == ["evaluator"]
    with pytest.raises(RuntimeError, match='needs macOS.*backend="evaluator"') as raised:
        runtime.open_package(stateful_package, backend="coreml")
    assert "\n" not in str(raised.value)
    assert runtime.open_package(stateful_package, backend="auto").backend == "evaluator"


@pytest.mark.macos
@on_macos
def test_auto_picks_coreml_on_macos(stateful_package):
    assert runtime.available_backends()[0] == "coreml"
    assert runtime.open_package(stateful_package, compute_units="CPU_ONLY").backend == "coreml"


@pytest.mark.macos
@on_macos
def test_coreml_matches_evaluator_with_state(stateful_package):
    coreml = runtime.open_package(stateful_package, backend="coreml", compute_units="CPU_ONLY")
    evaluator = runtime.open_package(stateful_package, backend="evaluator")
    assert coreml.inputs == evaluator.inputs and coreml.outputs == evaluator.outputs
    coreml_state, evaluator_state = coreml.new_state(), evaluator.new_state()
    for inputs in _steps():
        got = coreml.predict(inputs, coreml_state)["projected"]
        want = evaluator.predict(inputs, evaluator_state)["projected"]
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=COREML_VS_EVALUATOR_ATOL)
    np.testing.assert_allclose(
        coreml.state_arrays(coreml_state)["cache"].astype(np.float32),
        evaluator.state_arrays(evaluator_state)["cache"].astype(np.float32),
        atol=COREML_VS_EVALUATOR_ATOL,
    )
