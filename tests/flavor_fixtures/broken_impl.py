"""Stands for an implementation whose heavy dependency is missing."""

raise ImportError("No module named 'heavy_serving_lib' (simulated missing dependency)")
