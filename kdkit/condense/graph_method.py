"""Graph condensation on the one method contract: one step per seed, so a run resumes between seeds.

Step k runs seed s = first_seed + k: a stratified 80/10/10 split of the TU set (seed s), the method's
condensation of the training 80% (timed; `condense_split`), then for every GNN asked for, trainings scored the
same way on the same validation/test graphs:

- the method's set (e.g. Mirage's tree sets drawn by frequency, roots pooled);
- `random`: a random subset of training graphs stored in at most as many bytes as the condensed set
  (`graph_storage_bytes`), at least one graph per class, drawn uniformly;
- `full`: every training graph (the upper reference).

Both condensed trainings see `samples_per_epoch` graphs per epoch, so they get the same number of gradient
steps. Each finished seed's row (sizes, times, scores) is part of the checkpointed state; at the end
`metrics.json` holds every seed and the mean ± std, beside each seed's condensed set (`<method>-seed{s}.safetensors`).
A subclass (registered in a module of `methods/`) implements `condense_split`.
"""
from __future__ import annotations

import abc
import itertools
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch

from ..config import to_plain
from ..method import Method
from ..run import Run
from .computation_trees import labelled_graphs
from .graph_gnn import GraphClassifier, TrainSettings, train_graph_classifier
from .mirage import graph_storage_bytes


@dataclass
class CondensedGraphs:
    """A method's condensed training set for one split, as the GNN trainings and the report need it."""

    graphs: list  # torch-geometric graphs a GNN trains on
    weights: np.ndarray | None  # drawing probabilities of `graphs` (None: uniform)
    nbytes: int  # stored bytes, comparable with `graph_storage_bytes` of plain graphs
    save: Callable[[Path], Path]  # write the set; returns the file
    describe: str  # what the set is, in words ("12 tree sets over 30 trees")
    report: dict = field(default_factory=dict)  # the row's entry for the method (records, trees, ...)
    extra: dict = field(default_factory=dict)  # more row fields (e.g. a time breakdown)


def stratified_split(labels: np.ndarray, seed: int,
                     fractions=(0.8, 0.1, 0.1)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train/val/test indices with each class split in the given fractions (at least one val and test graph
    per class where the class has three or more), shuffled with `seed`."""
    rng = np.random.default_rng(seed)
    parts = ([], [], [])
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = len(idx)
        n_val = max(1, round(fractions[1] * n)) if n >= 3 else 0
        n_test = max(1, round(fractions[2] * n)) if n >= 3 else 0
        parts[0].append(idx[n_val + n_test:])
        parts[1].append(idx[:n_val])
        parts[2].append(idx[n_val:n_val + n_test])
    return tuple(rng.permutation(np.concatenate(p)).astype(np.int64) for p in parts)


def random_subset_by_bytes(graphs, budget: int, seed: int, has_edge_labels: bool) -> list[int]:
    """Indices of a uniformly random subset of `graphs` whose `graph_storage_bytes` sum to at most `budget`:
    one graph of each class first (so every class is seen), then others in random order while they fit."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(graphs)).tolist()
    chosen, taken, used, classes = [], set(), 0, set()
    sizes = [graph_storage_bytes(g, has_edge_labels) for g in graphs]
    for i in list(order):  # first pass: the first graph of each class in random order
        if graphs[i].y not in classes:
            classes.add(graphs[i].y)
            chosen.append(i)
            taken.add(i)
            used += sizes[i]
    for i in order:
        if i not in taken and used + sizes[i] <= budget:
            chosen.append(i)
            taken.add(i)
            used += sizes[i]
    return chosen


def mean_std(xs: list[float]) -> dict:
    xs = [x for x in xs if x == x]
    if not xs:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


class GraphCondenseMethod(Method):
    """See the module docstring."""

    kind: ClassVar[str] = "graph"
    resume_may_change: ClassVar[tuple[str, ...]] = ()
    log_every = 1
    save_every = 1
    layers: int = 2  # GNN message-passing layers (Mirage: its tree depth L)

    def __init__(self, ctx):
        self.ctx, self.cfg = ctx, ctx.config
        self.name = f"{self.cfg.method} {self.cfg.dataset} seeds"
        self.total_steps = self.cfg.seeds
        self.rows: list[dict] = []

    @abc.abstractmethod
    def condense_split(self, train_data: list, num_classes: int, widths: tuple[int, int]) -> CondensedGraphs:
        """Condense one split's training graphs (torch-geometric, one-hot labels of the given widths)."""

    def prepare(self, run: Run, resuming: bool) -> None:
        from ..data.tu import load_tu

        cfg = self.cfg
        self.run = run
        ds = self.ctx.graphs if self.ctx.graphs is not None else load_tu(cfg.dataset)
        self.data = [ds[i] for i in range(len(ds))]
        self.graphs = labelled_graphs(self.data)
        self.labels = np.asarray([g.y for g in self.graphs])
        self.num_classes = int(self.labels.max()) + 1
        self.in_dim = int(self.data[0].x.shape[1])
        ea = getattr(self.data[0], "edge_attr", None)
        self.edge_dim = int(ea.shape[1]) if ea is not None and ea.dim() == 2 else 0
        run.log(f"{cfg.dataset}: {len(self.graphs)} graphs, {self.num_classes} classes, node labels {self.in_dim}, "
                f"edge labels {self.edge_dim}; {cfg.method} depth {self.layers}, GNNs {cfg.gnns}, seeds {cfg.seeds}")

    def batches(self, start: int):
        return (self.cfg.first_seed + k for k in itertools.count(start))

    def new_model(self, gnn: str) -> GraphClassifier:
        cfg = self.cfg
        return GraphClassifier(gnn, self.in_dim, self.num_classes, hidden=cfg.hidden, layers=self.layers,
                               dropout=cfg.dropout, edge_dim=self.edge_dim, pool=cfg.pool)

    def step(self, seed: int) -> dict:
        cfg, run, method = self.cfg, self.run, self.cfg.method
        has_edges = self.edge_dim > 0
        tr, va, te = stratified_split(self.labels, seed)
        train_data = [self.data[i] for i in tr]
        val_data, test_data = [self.data[i] for i in va], [self.data[i] for i in te]
        t0 = time.perf_counter()  # timed from the torch-geometric graphs: label extraction is part of the cost
        condensed = self.condense_split(train_data, self.num_classes, (self.in_dim, self.edge_dim))
        condense_seconds = time.perf_counter() - t0
        original_bytes = sum(graph_storage_bytes(self.graphs[i], has_edges) for i in tr)
        file_bytes = None
        if cfg.save_condensed:
            file_bytes = condensed.save(run.run_dir / f"{method}-seed{seed}.safetensors").stat().st_size
        subset = random_subset_by_bytes([self.graphs[i] for i in tr], condensed.nbytes, seed, has_edges)
        subset_data = [train_data[i] for i in subset]
        subset_bytes = sum(graph_storage_bytes(self.graphs[tr[i]], has_edges) for i in subset)
        row = {"seed": seed, "split": {"train": len(tr), "val": len(va), "test": len(te)},
               "condense_seconds": condense_seconds, **condensed.extra,
               method: {**condensed.report, "nbytes": condensed.nbytes, "file_bytes": file_bytes},
               "original_bytes": original_bytes, "random": {"graphs": len(subset), "nbytes": subset_bytes},
               "results": {}}
        run.log(f"seed {seed}: condensed {len(tr)} graphs ({original_bytes:,} B) into {condensed.describe} "
                f"({condensed.nbytes:,} B) in {condense_seconds:.2f}s; random subset: {len(subset)} graphs "
                f"({subset_bytes:,} B)")
        n = cfg.samples_per_epoch

        def condensed_epoch(rng, _g=condensed.graphs, _w=condensed.weights):
            return [_g[i] for i in rng.choice(len(_g), size=n, p=_w)]

        def random_epoch(rng, _g=subset_data):
            return [_g[i] for i in rng.choice(len(_g), size=n)]

        def full_epoch(rng, _g=train_data):
            return [_g[i] for i in rng.permutation(len(_g))]

        draws = {method: condensed_epoch, "random": random_epoch, "full": full_epoch}
        settings = TrainSettings(epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 batch_size=cfg.batch_size, hidden=cfg.hidden, dropout=cfg.dropout, pool=cfg.pool)
        for gnn in cfg.gnns:
            row["results"][gnn] = {}
            for what in [method, *cfg.baselines]:
                torch.manual_seed(seed)
                res = train_graph_classifier(self.new_model(gnn), draws[what], val_data, test_data, settings,
                                             seed=seed)
                res.pop("history")
                row["results"][gnn][what] = res
                run.log(f"seed {seed} {gnn} {what}: test ROC-AUC {res['test_auc']:.4f} acc {res['test_acc']:.4f} "
                        f"(best val ROC-AUC {res['val_auc']:.4f} at epoch {res['epoch']}, "
                        f"{res['train_seconds']:.1f}s)")
        self.rows.append(row)
        logs = {"seed": float(seed), "condense_seconds": condense_seconds, "nbytes": float(condensed.nbytes),
                **{f"{gnn}/{what}/test_auc": r["test_auc"] for gnn, by in row["results"].items()
                   for what, r in by.items()}}
        return {k: v for k, v in logs.items() if math.isfinite(v)}  # an undefined ROC-AUC stays in metrics.json

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        self.rows = list(state["rows"])

    def artefacts(self, run: Run) -> dict:
        cfg, method = self.cfg, self.cfg.method
        per_seed = self.rows[:cfg.seeds]
        whats = [method, *cfg.baselines]
        summary = {"condense_seconds": mean_std([r["condense_seconds"] for r in per_seed]),
                   f"{method}_nbytes": mean_std([r[method]["nbytes"] for r in per_seed]),
                   "original_bytes": mean_std([r["original_bytes"] for r in per_seed]),
                   "random_nbytes": mean_std([r["random"]["nbytes"] for r in per_seed]),
                   "random_graphs": mean_std([r["random"]["graphs"] for r in per_seed])}
        summary.update(self.summary_extra(per_seed))
        for gnn in cfg.gnns:
            for what in whats:
                for metric in ("test_auc", "test_acc"):
                    summary[f"{gnn}/{what}/{metric}"] = mean_std([r["results"][gnn][what][metric] for r in per_seed])
        metrics = {"dataset": cfg.dataset, "method": method, "config": to_plain(cfg), "summary": summary,
                   "seeds": per_seed, "run_dir": str(run.run_dir)}
        run.write_json("metrics.json", metrics)
        for gnn in cfg.gnns:
            parts = [f"{what} {100 * summary[f'{gnn}/{what}/test_auc']['mean']:.2f} ± "
                     f"{100 * summary[f'{gnn}/{what}/test_auc']['std']:.2f}" for what in whats]
            run.log(f"{cfg.dataset} {gnn} test ROC-AUC (%): " + ", ".join(parts))
        run.log(f"condensation {summary['condense_seconds']['mean']:.2f}s per split; {method} "
                f"{summary[f'{method}_nbytes']['mean']:,.0f} B vs original {summary['original_bytes']['mean']:,.0f} B; "
                f"run folder {run.run_dir}")
        return metrics

    def summary_extra(self, per_seed: list[dict]) -> dict:
        """More summary entries from the method's own row fields."""
        return {}
