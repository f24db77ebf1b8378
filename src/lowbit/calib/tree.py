"""Nested tuples / lists / dicts of tensors (block arguments): map, compare, batch and split them."""

from __future__ import annotations

from collections import UserDict

import torch


def tree_map(fn, value):
    """`fn` applied to every leaf; containers rebuilt with their own type (a UserDict stays one)."""
    if isinstance(value, tuple):
        return type(value)(*(tree_map(fn, v) for v in value)) if hasattr(value, "_fields") else tuple(tree_map(fn, v) for v in value)
    if isinstance(value, list):
        return [tree_map(fn, v) for v in value]
    if isinstance(value, (dict, UserDict)):
        out = type(value)() if isinstance(value, UserDict) else {}
        for k, v in value.items():
            out[k] = tree_map(fn, v)
        return out
    return fn(value)


def tree_leaves(value) -> list:
    leaves = []
    tree_map(leaves.append, value)
    return leaves


def tree_equal(a, b) -> bool:
    """Same structure and equal leaves (tensors: same shape, dtype and values)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and (a is b or torch.equal(a, b.to(a.device)))
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(tree_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, (dict, UserDict)):
        return a.keys() == b.keys() and all(tree_equal(a[k], b[k]) for k in a)
    return a is b or a == b


def to_device(value, device, non_blocking: bool = False):
    return tree_map(lambda t: t.to(device, non_blocking=non_blocking) if isinstance(t, torch.Tensor) else t, value)


def cat_samples(values: list):
    """Per-sample trees (leaves [1, ...]) -> one tree with leaves [n, ...]."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(values)
    if isinstance(first, tuple):
        return tuple(cat_samples([v[i] for v in values]) for i in range(len(first)))
    if isinstance(first, list):
        return [cat_samples([v[i] for v in values]) for i in range(len(first))]
    if isinstance(first, (dict, UserDict)):
        return {k: cat_samples([v[k] for v in values]) for k in first}
    return first


def split_samples(value, n: int) -> list:
    """Inverse of cat_samples: leaves [n, ...] -> n trees with leaves [1, ...]."""
    return [tree_map(lambda t: t[i : i + 1] if isinstance(t, torch.Tensor) else t, value) for i in range(n)]
