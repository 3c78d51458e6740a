"""A flavor module that needs a dependency that is not installed."""

import modeld_test_dependency_that_does_not_exist  # noqa: F401
