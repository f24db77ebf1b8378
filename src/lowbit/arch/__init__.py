"""Architecture knowledge as data: one `ArchSpec` per model family, registered by HF architecture name."""

from .spec import ArchSpec, ScaleGroup, register, spec_for, registered_architectures
from . import families  # noqa: F401  (registers the built-in specs)

__all__ = ["ArchSpec", "ScaleGroup", "register", "spec_for", "registered_architectures"]
