"""The one set of helpers for nested-dict parameter trees: paths in and out, and counting.

A path is a tuple of keys (``("layers_0", "attn", "q")``); on disk and in messages it is written "/"-joined.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Iterator

import jax


def get(tree: Mapping, path: tuple[str, ...], what: str = "the tree") -> Any:
    """The node at ``path``; a KeyError naming the first missing key otherwise."""
    node = tree
    for i, k in enumerate(path):
        if not isinstance(node, Mapping) or k not in node:
            raise KeyError(f"{'/'.join(path)}: {what} has no {'/'.join(path[:i + 1])!r}")
        node = node[k]
    return node


def put(tree: dict, path: tuple[str, ...], value: Any) -> None:
    """Set the leaf at ``path`` in place, creating the dicts on the way."""
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def leaves(tree: Any, is_leaf=None) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path, leaf) for every leaf of a nested-dict pytree, in jax's (sorted key) order; ``is_leaf`` as in jax
    (e.g. a quantized weight taken whole)."""
    for keys, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]:
        yield tuple(str(getattr(k, "key", k)) for k in keys), leaf


def replace(tree: Mapping, updates: Mapping[tuple[str, ...], Any]) -> dict:
    """A copy of ``tree`` with leaves set at the given paths; untouched subtrees are shared, not copied."""
    out = dict(tree)
    heads: dict = {}
    for path, value in updates.items():
        heads.setdefault(path[0], {})[path[1:]] = value
    for k, sub in heads.items():
        out[k] = sub[()] if () in sub else replace(tree.get(k, {}), sub)
    return out


def count(tree: Any) -> int:
    """Number of elements over all leaves (arrays or ShapeDtypeStructs): a parameter count."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
