"""Stage 2: the checkpoint's tensors, read lazily and validated against config.json, and
their content digests (what every artifact key is made of)."""
