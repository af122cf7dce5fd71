"""Stage 5: lowerings of the one graph (graph/decoder.py): mil/ emits iOS18 ML Programs
for the Core ML packages; torch/ runs it eagerly in fp32 as the project's reference."""
