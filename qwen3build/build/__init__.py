"""Stage 6: the build graph. What each artifact reads (declare.py, declared.py) and how it
is made (artifacts/), keys (keys.py), the verified action cache (cache.py), publishing a
whole stack at once (publish.py), the tree lock (lock.py), and the doit glue."""
