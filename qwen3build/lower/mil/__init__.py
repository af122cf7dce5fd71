"""The MIL lowering: graph ops as iOS18 MIL (ops.py), quantized weights as constexpr ops
(quant.py), the programs of each package kind (programs.py, sampler.py), and conversion
to deterministic .mlpackage bytes (save.py). Imports coremltools."""
