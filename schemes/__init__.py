"""Scheme presets (TOML). Installed as the package ``qconvert.schemes``."""
