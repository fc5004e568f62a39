"""Graph classifiers (GCN, GIN, GAT, GraphSAGE in torch-geometric) and the loop that trains and scores them.

One model serves both kinds of input Mirage needs: a tree-set graph (disjoint union of computation
trees, edges child -> parent, `root_mask` on the roots) is pooled over its *roots* -- after L layers
a root's embedding is its computation tree's embedding -- while a full graph is pooled over *all*
nodes, i.e. over all its computation trees. Sum pooling (the paper's choice) makes the two
pooled vectors the same kind of quantity: a sum of tree embeddings.

Scores: ROC-AUC (the paper's metric; one-vs-rest macro average for more than two classes) and
accuracy, on the test set at the epoch of best validation ROC-AUC.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError

GNNS = ("gcn", "gin", "gat", "sage")


def check_gnn(name: str) -> str:
    key = str(name).strip().lower()
    aliases = {"graphsage": "sage", "gcnconv": "gcn", "ginconv": "gin", "gatconv": "gat"}
    key = aliases.get(key, key)
    if key not in GNNS:
        raise ConfigError(f"unknown GNN '{name}'; choices: {', '.join(GNNS)}")
    return key


class GraphClassifier(nn.Module):
    """Linear label embedding -> `layers` message-passing layers -> pool (roots, or all nodes) -> linear head.

    `edge_dim` > 0 feeds one-hot edge labels to GAT (attention) and GIN (as GINE); GCN and GraphSAGE
    have no edge-feature input in torch-geometric and use structure and node labels only.
    """

    def __init__(self, gnn: str, in_dim: int, num_classes: int, hidden: int = 128, layers: int = 2,
                 dropout: float = 0.5, edge_dim: int = 0, pool: str = "sum"):
        super().__init__()
        from torch_geometric.nn import GATConv, GCNConv, GINConv, GINEConv, SAGEConv

        self.gnn = check_gnn(gnn)
        if pool not in ("sum", "mean"):
            raise ConfigError(f"pool must be 'sum' or 'mean', got {pool!r}")
        if layers <= 0:
            raise ConfigError(f"layers must be a positive integer, got {layers!r}")
        self.pool, self.dropout, self.edge_dim = pool, dropout, edge_dim
        self.embed = nn.Linear(in_dim, hidden)
        self.convs = nn.ModuleList()
        for _ in range(layers):
            if self.gnn == "gcn":
                conv = GCNConv(hidden, hidden)
            elif self.gnn == "sage":
                conv = SAGEConv(hidden, hidden)
            elif self.gnn == "gat":
                conv = GATConv(hidden, hidden, heads=1, edge_dim=edge_dim or None)
            else:
                mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
                conv = GINEConv(mlp, edge_dim=edge_dim) if edge_dim else GINConv(mlp)
            self.convs.append(conv)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, data) -> torch.Tensor:
        from torch_geometric.utils import scatter

        h = self.embed(data.x)
        edge_attr = getattr(data, "edge_attr", None) if self.edge_dim and self.gnn in ("gat", "gin") else None
        for i, conv in enumerate(self.convs):
            h = conv(h, data.edge_index, edge_attr) if edge_attr is not None else conv(h, data.edge_index)
            if i < len(self.convs) - 1:
                h = torch.relu(h)
            h = nn.functional.dropout(h, self.dropout, self.training)
        batch = data.batch if getattr(data, "batch", None) is not None else torch.zeros(h.shape[0], dtype=torch.long)
        size = int(data.num_graphs) if hasattr(data, "num_graphs") else 1
        mask = getattr(data, "root_mask", None)
        if mask is not None:
            h, batch = h[mask], batch[mask]
        g = scatter(h, batch, dim=0, dim_size=size, reduce=self.pool)
        return self.head(nn.functional.dropout(g, self.dropout, self.training))


def roc_auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """ROC-AUC: of class 1's probability for two classes, one-vs-rest macro average for more; NaN if only
    one class is present."""
    from sklearn.metrics import roc_auc_score

    y_true = np.asarray(y_true)
    if len(np.unique(y_true)) < 2:
        return float("nan")
    if probs.shape[1] == 2:
        return float(roc_auc_score(y_true, probs[:, 1]))
    present = np.unique(y_true)
    return float(roc_auc_score(y_true, probs[:, present] / probs[:, present].sum(1, keepdims=True),
                               multi_class="ovr", labels=present))


@torch.no_grad()
def evaluate(model: GraphClassifier, batch) -> dict:
    """ROC-AUC, accuracy and mean cross-entropy of `model` on one collated batch of full graphs."""
    model.eval()
    logits = model(batch)
    y = batch.y.view(-1)
    probs = torch.softmax(logits, dim=1).numpy()
    return {"auc": roc_auc(y.numpy(), probs), "acc": float((logits.argmax(1) == y).float().mean()),
            "loss": float(nn.functional.cross_entropy(logits, y))}


@dataclass
class TrainSettings:
    """GNN training hyper-parameters (defaults follow the official Mirage code: 128 hidden, dropout 0.5,
    Adam at 1e-3, sum pooling; epochs and weight decay are ours -- see the README)."""

    epochs: int = 100
    lr: float = 1e-3
    weight_decay: float = 5e-4
    batch_size: int = 64
    hidden: int = 128
    dropout: float = 0.5
    pool: str = "sum"


def train_graph_classifier(model: GraphClassifier, draw_epoch: Callable[[np.random.Generator], list],
                           val, test, settings: TrainSettings, seed: int = 0,
                           log: Callable[[str], None] | None = None, every_test: bool = False) -> dict:
    """Train on the graphs `draw_epoch(rng)` returns for each epoch; score val and test every epoch.

    Returns the test ROC-AUC/accuracy at the epoch of best validation ROC-AUC (later epochs win ties),
    that epoch, the best validation scores and the training time. The test set is scored only at epochs
    whose result is kept (and the last), unless `every_test`.
    """
    from torch_geometric.data import Batch

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    val_batch, test_batch = Batch.from_data_list(list(val)), Batch.from_data_list(list(test))
    best = {"val_auc": -1.0}
    t0 = time.perf_counter()
    history = []
    for epoch in range(1, settings.epochs + 1):
        model.train()
        graphs = draw_epoch(rng)
        total = 0.0
        for lo in range(0, len(graphs), settings.batch_size):
            batch = Batch.from_data_list(graphs[lo:lo + settings.batch_size])
            loss = nn.functional.cross_entropy(model(batch), batch.y.view(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * batch.num_graphs
        v = evaluate(model, val_batch)
        improved = not np.isnan(v["auc"]) and v["auc"] >= best["val_auc"]
        last = epoch == settings.epochs
        t = evaluate(model, test_batch) if improved or last or every_test else None  # test only where it is read
        history.append({"epoch": epoch, "train_loss": total / max(len(graphs), 1), "val_auc": v["auc"],
                        "val_acc": v["acc"], **({"test_auc": t["auc"], "test_acc": t["acc"]} if t else {})})
        if improved:
            best = {"epoch": epoch, "val_auc": v["auc"], "val_acc": v["acc"], "test_auc": t["auc"], "test_acc": t["acc"]}
        if log and (epoch == 1 or epoch % max(1, settings.epochs // 5) == 0 or last):
            log(f"  epoch {epoch}: loss {history[-1]['train_loss']:.4f} val auc {v['auc']:.4f}")
    if "epoch" not in best:  # validation AUC undefined (one class): report the last epoch
        best = {"epoch": settings.epochs, "val_auc": float("nan"), "val_acc": history[-1]["val_acc"],
                "test_auc": history[-1]["test_auc"], "test_acc": history[-1]["test_acc"]}
    best["train_seconds"] = time.perf_counter() - t0
    best["history"] = history
    return best
