"""The refusal shared by formats whose groups must tile in_features exactly (no partial last group)."""

from __future__ import annotations

from ..config import Scheme


def partial_group_refusal(format_name: str, scheme: Scheme, in_features: set[int]) -> str | None:
    """Why `format_name` cannot hold `scheme` for these layers (a partial last group), or None."""
    bad = sorted(k for k in in_features if k % scheme.group_size)
    if not bad:
        return None
    return (f"{format_name} needs group_size to divide every layer's in_features, but {bad[0]} % {scheme.group_size} = "
            f"{bad[0] % scheme.group_size}; pick a group size that divides it, or use --format auto_round or auto_gptq (partial groups)")
