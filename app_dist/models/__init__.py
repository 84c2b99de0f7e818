"""Network definitions for APP training; every model normalises its own input."""

from .normalization import InputNormalization, NormalizedModel
from .registry import MODEL_NAMES, build_model, classifier_of

__all__ = ["MODEL_NAMES", "InputNormalization", "NormalizedModel", "build_model", "classifier_of"]
