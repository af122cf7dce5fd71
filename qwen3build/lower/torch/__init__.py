"""The eager fp32 torch lowering of the graph: the project's reference (reference.py)."""
