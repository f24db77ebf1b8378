"""Open checkpoints, build meta skeletons, stream one module's tensors in and out."""

from .checkpoint import Checkpoint
from .source import resolve_model
from .skeleton import build_skeleton, free_module, load_module

__all__ = ["Checkpoint", "resolve_model", "build_skeleton", "load_module", "free_module"]
