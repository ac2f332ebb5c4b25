"""ml-collections experiment configs: `get_config(arg)` with presets (`file.py:preset`)."""
