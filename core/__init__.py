"""Project-wide leaf modules: the error family (imports nothing of ours)."""
