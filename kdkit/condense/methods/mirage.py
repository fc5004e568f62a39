"""`kdkit condense <tu set> --method mirage`: Mirage's computation-tree sets (algorithm: `condense/mirage.py`,
`computation_trees.py`, `tree_mining.py`). Per-dataset supports are the recipes
`recipes/condense-<dataset>-mirage.yaml`."""
from __future__ import annotations

import numpy as np

from ...config import PositiveInt
from ...method import register_method
from ..graph_method import CondensedGraphs, GraphCondenseMethod, mean_std
from ..mirage import condense_mirage
from ..tree_mining import Support


@register_method("condense", "mirage")
class MirageMethod(GraphCondenseMethod):
    """Mirage (Gupta et al., ICLR 2024): model-agnostic, training-free tree-set condensation."""

    def __init__(self, ctx, *, depth: PositiveInt = 2, min_support: Support | list[Support] | None = None,
                 top_trees: PositiveInt = 12, max_len: PositiveInt | None = None, drop_shared: bool = False):
        # depth: L, the computation-tree depth = the GNN's layers; min_support per class: a fraction in (0, 1] or
        # a count >= 1, one per class as a list, or null to keep about `top_trees` frequent trees per class;
        # max_len caps a tree set's size; drop_shared drops sets frequent in several classes
        super().__init__(ctx)
        self.layers, self.min_support, self.top_trees = depth, min_support, top_trees
        self.max_len, self.drop_shared = max_len, drop_shared

    def condense_split(self, train_data, num_classes, widths) -> CondensedGraphs:
        condensed = condense_mirage(train_data, depth=self.layers, min_support=self.min_support,
                                    top_trees=self.top_trees, max_len=self.max_len, drop_shared=self.drop_shared,
                                    num_classes=num_classes, label_widths=widths)
        per_class = np.bincount(condensed.set_label.astype(np.int64), minlength=num_classes).tolist()
        return CondensedGraphs(
            graphs=[condensed.to_pyg(r) for r in range(len(condensed))], weights=condensed.sampling_weights(),
            nbytes=condensed.nbytes, save=condensed.save,
            describe=f"{len(condensed)} tree sets over {condensed.num_trees} trees",
            report={"records": len(condensed), "records_per_class": per_class, "trees": condensed.num_trees,
                    "materialized_nodes": condensed.materialized_nodes(),
                    "support_counts": condensed.info["support_counts"]},
            extra={"condense_breakdown": condensed.info["seconds"]})

    def summary_extra(self, per_seed):
        return {"records": mean_std([r["mirage"]["records"] for r in per_seed])}
