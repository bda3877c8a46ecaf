"""A user's own package, outside vfmkd, used by tests/test_custom_imports.py."""
