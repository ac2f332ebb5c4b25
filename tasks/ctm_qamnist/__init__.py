"""Task package; see tasks/__init__.py for its parts."""
