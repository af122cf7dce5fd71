"""Weight quantization math (pure numpy) and its MIL emission for coremltools iOS18."""
