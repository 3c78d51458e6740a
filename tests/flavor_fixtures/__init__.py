"""Flavors used by tests/test_deployers_unit.py: one that works (in memory),
one whose implementation cannot be imported, and one per way to be wrong."""
