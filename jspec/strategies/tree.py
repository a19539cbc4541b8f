"""Static draft-tree templates for speculative decoding.

A template is the shape of the draft: N nodes, each with a parent (-1 is the root, the last committed
token). Node i sits at depth(i) below the root; nodes are numbered breadth-first, so every level is a
contiguous range. A chain of n drafts is the template with branching 1 at every depth. Siblings are ranked:
child j of a node is the draft's j-th most likely token there.

Everything here is numpy, computed once at trace time (the template is a static argument): the verification
mask, position offsets, child tables and level ranges become constants in the compiled step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np
from jspec.validation import ArgumentError


@dataclasses.dataclass(frozen=True)
class TreeTemplate:
    parents: tuple[int, ...]  # parent node of each node; -1 = the root

    def __post_init__(self):
        parents = tuple(int(p) for p in self.parents)
        object.__setattr__(self, "parents", parents)
        if not parents:
            raise ArgumentError("tree: expected at least one draft node, got an empty template")
        depths: list[int] = []
        for node, parent in enumerate(parents):
            if not -1 <= parent < node:
                raise ArgumentError(
                    f"tree: node {node} has parent {parent}; a tree template lists parents before children "
                    "(each parent is -1 for the root or an earlier node)"
                )
            depths.append(1 if parent < 0 else depths[parent] + 1)
            if node and depths[node] < depths[node - 1]:
                raise ArgumentError(f"tree: nodes must be numbered breadth-first (node {node} is shallower than node {node - 1})")

    @classmethod
    def chain(cls, length: int) -> "TreeTemplate":
        """A chain of `length` drafts."""
        if length < 1:
            raise ArgumentError(f"num_draft_tokens: expected an int >= 1, got {length}")
        return cls(tuple(range(-1, length - 1)))

    @classmethod
    def from_branching(cls, branching: Sequence[int]) -> "TreeTemplate":
        """Every node at depth d has branching[d] children (the top-k at that node): e.g. (3, 2, 1)."""
        if not branching or any(int(b) < 1 for b in branching):
            raise ArgumentError(f"tree: expected branching factors >= 1 per depth, e.g. (3, 2, 1); got {tuple(branching)}")
        parents: list[int] = []
        level = [-1]
        for factor in branching:
            next_level = []
            for parent in level:
                for _ in range(int(factor)):
                    next_level.append(len(parents))
                    parents.append(parent)
            level = next_level
        return cls(tuple(parents))

    @property
    def num_nodes(self) -> int:
        return len(self.parents)

    @functools.cached_property
    def depths(self) -> np.ndarray:  # [N] int32, 1-based
        depths = np.zeros(self.num_nodes, np.int32)
        for node, parent in enumerate(self.parents):
            depths[node] = 1 if parent < 0 else depths[parent] + 1
        return depths

    @property
    def max_depth(self) -> int:
        return int(self.depths.max())

    @property
    def is_chain(self) -> bool:
        return self.parents == tuple(range(-1, self.num_nodes - 1))

    @functools.cached_property
    def levels(self) -> tuple[tuple[int, int], ...]:
        """(first node, end node) of each depth 1..max_depth."""
        return tuple(
            (int(np.argmax(self.depths == d)), int(np.argmax(self.depths == d)) + int(np.sum(self.depths == d)))
            for d in range(1, self.max_depth + 1)
        )

    @functools.cached_property
    def children(self) -> np.ndarray:
        """[N + 1, max children] int32: children of the root (row 0) and of node i (row i + 1), -1 padded,
        in sibling rank order."""
        lists: list[list[int]] = [[] for _ in range(self.num_nodes + 1)]
        for node, parent in enumerate(self.parents):
            lists[parent + 1].append(node)
        width = max(len(c) for c in lists)
        table = np.full((self.num_nodes + 1, width), -1, np.int32)
        for row, nodes in enumerate(lists):
            table[row, : len(nodes)] = nodes
        return table

    @functools.cached_property
    def sibling_rank(self) -> np.ndarray:
        """[N] int32: the rank of each node among its siblings (0 = the draft's most likely child)."""
        ranks = np.zeros(self.num_nodes, np.int32)
        for row in self.children:
            for rank, node in enumerate(row):
                if node >= 0:
                    ranks[node] = rank
        return ranks

    @functools.cached_property
    def ancestors(self) -> np.ndarray:
        """[N + 1, N + 1] bool over (root, nodes): entry [i, j] says j is i or an ancestor of i.

        This is the verification mask inside the tree: the root and every node see the root, and each node
        sees its ancestors and itself (SpecInfer / EAGLE tree attention).
        """
        size = self.num_nodes + 1
        table = np.eye(size, dtype=bool)
        table[:, 0] = True
        for node, parent in enumerate(self.parents):
            table[node + 1] |= table[parent + 1]
        return table
