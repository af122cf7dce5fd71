"""Backends for graph.py: eager torch (the reference) and MIL (the packages)."""
