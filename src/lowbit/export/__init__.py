"""Export formats: each module turns QuantResults into exactly the tensors and config its loaders read."""

from . import auto_round
from .shards import ShardWriter

FORMAT_WRITERS = {"auto_round": auto_round}

__all__ = ["ShardWriter", "FORMAT_WRITERS", "auto_round"]
