"""Static numerics of the re-authored graph: tables and SLaNC scales (pure numpy)."""
