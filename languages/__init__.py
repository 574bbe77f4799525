"""Per-language pipeline configs (`*.yaml`), shipped as package data and read through `importlib.resources`."""
