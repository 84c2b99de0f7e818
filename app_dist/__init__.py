"""app-dist: Anytime Progressive Pruning (APP) trained under the ALMA megabatch stream."""

__version__ = "0.1.0"
