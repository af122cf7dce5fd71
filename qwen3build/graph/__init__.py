"""Stage 3: the deployed model's math, written once against a small `ops` interface
(decoder.py), its static tables (tables.py), its fp16 pre-scales (slanc.py), and the
sampling rules (sampler.py). Lowerings (lower/) turn it into MIL, eager torch, ..."""
