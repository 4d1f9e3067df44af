"""Hydra discovers the sweeper here (hydra_plugins is a namespace package; this one must be a package)."""
