"""Network definitions for APP training; every model normalises its own input.

registry.py builds a model by name; names.py lists the names without importing torch."""
