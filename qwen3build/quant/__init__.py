"""Stage 4: weight quantization. The math (lut.py: grouped-LUT k-means; blockwise.py:
int8/int4 blocks), the pack files (packfile.py), fitting one layer's or the embedding's
packs (packs.py), and the weights exactly as a recipe packs them (provider.py), which
every lowering takes its weights from. Pure numpy: no coremltools here."""
