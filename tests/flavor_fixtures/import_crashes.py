"""A flavor module that breaks while being imported."""

raise RuntimeError("flavor module exploded on import")
