"""Dataset distillation: condense a training set into a much smaller one that still trains a model.

Graphs: Mirage (`mirage.py`), model-agnostic condensation into frequent computation-tree sets
(`computation_trees.py`, `tree_mining.py`), trained and scored with `graph_gnn.py`, run with
baselines by `graph_run.py`. `run.condense(dataset, method)` dispatches by dataset kind; the CLI is
`kdkit condense DATASET --method M`. Heavy imports (torch-geometric, mlxtend) happen on use.
"""
from __future__ import annotations

from .run import KINDS, condense, dataset_kind, register_kind, register_method

__all__ = ["KINDS", "condense", "condense_mirage", "decompose", "MirageDataset", "TreeVocabulary", "dataset_kind",
           "register_kind", "register_method"]


def __getattr__(name: str):  # lazy: `from kdkit.condense import condense_mirage` without importing torch up front
    if name in ("condense_mirage", "MirageDataset", "graph_storage_bytes"):
        from . import mirage

        return getattr(mirage, name)
    if name in ("decompose", "TreeVocabulary", "LabelledGraph", "GraphLabelError"):
        from . import computation_trees

        return getattr(computation_trees, name)
    raise AttributeError(f"module 'kdkit.condense' has no attribute {name!r}")
