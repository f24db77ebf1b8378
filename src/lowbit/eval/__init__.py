"""Perplexity and generation checks."""

from .perplexity import perplexity
from .generate import generate

__all__ = ["perplexity", "generate"]
