"""Frequent computation-tree sets per class: FP-Growth (mlxtend) over "graph = set of its tree ids" transactions.

Mirage keeps the sets of computation trees that *co-occur* in many graphs of a class, not single
trees: a GNN's graph embedding is a sum over its nodes' trees, so a set of trees seen together is a
summary of many graphs at once. Supports are class-specific because classes differ in size and in
how diverse their graphs are (the paper tunes one threshold per class); each set keeps its count
(the number of graphs of that class containing every tree of the set), which training later uses
to sample sets in proportion to how often they occur.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Annotated

import numpy as np

from ..config import Range
from ..errors import ConfigError

# a minimum support: an absolute count of graphs (>= 1), or a fraction of a class's graphs in (0, 1]
Support = Annotated[int, Range(ge=1)] | Annotated[float, Range(gt=0, le=1)]


@dataclass(frozen=True)
class FrequentTreeSet:
    """A set of tree ids (sorted), the class it was mined in, and how many graphs of that class contain it."""

    trees: tuple[int, ...]
    label: int
    frequency: int


def _as_count(min_support: float | int, n: int, where: str) -> int:
    """A support given as a fraction in (0, 1] or as an absolute count >= 1, as a count of transactions."""
    if isinstance(min_support, bool) or not isinstance(min_support, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{where}: min_support must be a fraction in (0, 1] or a count >= 1, got {min_support!r}")
    if isinstance(min_support, (int, np.integer)) and min_support >= 1:
        return int(min_support)
    if not 0 < float(min_support) <= 1:
        raise ConfigError(f"{where}: min_support must be a fraction in (0, 1] or a count >= 1, got {min_support!r}")
    return max(1, math.ceil(float(min_support) * n - 1e-9))


def frequent_tree_sets(transactions, min_support: float | int, max_len: int | None = None) -> list[tuple[tuple[int, ...], int]]:
    """All sets of tree ids contained in at least `min_support` transactions, with their counts, by FP-Growth.

    `transactions` is a list of collections of tree ids (duplicates within one are ignored);
    `min_support` a fraction of the transactions or an absolute count. Sorted by count, then set.
    """
    import pandas as pd
    from mlxtend.frequent_patterns import fpgrowth
    from scipy import sparse

    sets = [sorted(set(int(t) for t in tr)) for tr in transactions]
    n = len(sets)
    if n == 0:
        return []
    need = _as_count(min_support, n, "frequent_tree_sets")
    counts = Counter(t for s in sets for t in s)
    items = sorted(t for t, c in counts.items() if c >= need)  # only these can be in a frequent set
    if not items:
        return []
    col = {t: i for i, t in enumerate(items)}
    rows, cols = [], []
    for r, s in enumerate(sets):
        for t in s:
            if t in col:
                rows.append(r)
                cols.append(col[t])
    matrix = sparse.csr_matrix((np.ones(len(rows), dtype=bool), (rows, cols)), shape=(n, len(items)))
    frame = pd.DataFrame.sparse.from_spmatrix(matrix)  # columns 0..k-1 (mlxtend's sparse path needs that)
    # mlxtend compares item supports as fractions and itemset supports as ceil(min_support * n):
    # half a transaction below the wanted count makes both mean exactly "count >= need".
    found = fpgrowth(frame, min_support=(need - 0.5) / n, use_colnames=True, max_len=max_len)
    out = [(tuple(sorted(items[int(i)] for i in s)), int(round(sup * n)))
           for s, sup in zip(found["itemsets"], found["support"])]
    out.sort(key=lambda p: (-p[1], len(p[0]), p[0]))
    return out


def support_for_top_trees(transactions, top_trees: int) -> int:
    """The count of the `top_trees`-th most frequent single tree: a class-specific threshold that keeps about
    that many trees, for datasets where no hand-tuned support exists."""
    counts = sorted(Counter(t for tr in transactions for t in set(tr)).values(), reverse=True)
    if not counts:
        return 1
    return max(2, counts[min(top_trees, len(counts)) - 1]) if len(transactions) > 1 else 1


def per_class_supports(min_support, classes: list[int]) -> dict[int, float | int]:
    """`min_support` as {class: support}: one number for every class, a list (one per class, in class order),
    or a dict keyed by class."""
    if isinstance(min_support, dict):
        missing = [c for c in classes if c not in min_support]
        if missing:
            raise ConfigError(f"min_support has no entry for classes {missing}; give one per class {classes}")
        return {c: min_support[c] for c in classes}
    if isinstance(min_support, (list, tuple)):
        if len(min_support) != len(classes):
            raise ConfigError(f"min_support lists {len(min_support)} values for {len(classes)} classes {classes}")
        return dict(zip(classes, min_support))
    return {c: min_support for c in classes}


def mine_per_class(tree_ids_per_graph, labels, min_support=None, top_trees: int = 12, max_len: int | None = None,
                   drop_shared: bool = True) -> tuple[list[FrequentTreeSet], dict[int, int]]:
    """Frequent tree sets of every class, and the support count used for each class.

    `min_support` is per class (see `per_class_supports`); None picks each class's threshold from
    `top_trees` (see `support_for_top_trees`). With `drop_shared` a set frequent in more than one class
    is dropped: it says nothing about the class (the official NCI1 code does the same for two classes).
    """
    labels = [int(y) for y in labels]
    classes = sorted(set(labels))
    by_class = {c: [set(np.asarray(t).tolist()) for t, y in zip(tree_ids_per_graph, labels) if y == c] for c in classes}
    if min_support is None:
        needs = {c: support_for_top_trees(by_class[c], top_trees) for c in classes}
    else:
        sup = per_class_supports(min_support, classes)
        needs = {c: _as_count(sup[c], len(by_class[c]), f"min_support for class {c}") for c in classes}
    mined = {c: frequent_tree_sets(by_class[c], needs[c], max_len=max_len) for c in classes}
    seen = Counter(s for c in classes for s, _ in mined[c])
    out = [FrequentTreeSet(s, c, f) for c in classes for s, f in mined[c] if not (drop_shared and seen[s] > 1)]
    return out, needs
