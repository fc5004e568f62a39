"""Dataset distillation: condense a training set into a much smaller one that still trains a model.

`kdkit condense DATASET --method M` (`run.condense`): images (CIFAR-10: DM, MTT, DATM, CV-DD) and graphs (the TU
sets: Mirage). Each method is a factory registered with `@register_method("condense", NAME)` in a module of
`methods/`, run by `kdkit.method.fit` in one `kdkit.run.Run`; its paper settings are recipes
(`recipes/condense-*.yaml`). Heavy imports (torch-geometric, mlxtend) happen on use.
"""
from __future__ import annotations

__all__ = ["KINDS", "condense", "condense_mirage", "decompose", "MirageDataset", "TreeVocabulary", "dataset_kind",
           "run_condense"]


def __getattr__(name: str):  # lazy: `from kdkit.condense import condense_mirage` without importing torch up front
    if name in ("KINDS", "condense", "dataset_kind", "run_condense"):
        from . import run

        return getattr(run, name)
    if name in ("condense_mirage", "MirageDataset", "graph_storage_bytes"):
        from . import mirage

        return getattr(mirage, name)
    if name in ("decompose", "TreeVocabulary", "LabelledGraph", "GraphLabelError"):
        from . import computation_trees

        return getattr(computation_trees, name)
    raise AttributeError(f"module 'kdkit.condense' has no attribute {name!r}")
