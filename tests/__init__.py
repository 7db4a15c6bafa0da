"""avd test suite."""
