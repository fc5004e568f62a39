"""Computation trees: what an L-layer message-passing GNN actually sees of a graph, one rooted tree per node.

An L-layer GNN computes a node's embedding from its L-hop computation tree: the node, each neighbour
under it (joined by that edge's label), each of *their* neighbours under those (the node it came
from included), down to depth L. Two nodes whose trees are isomorphic (same labels, same shape,
children unordered) get the same embedding from every message-passing GNN, so a graph is, to the
GNN, a multiset of these trees -- the observation Mirage (Gupta et al., ICLR 2024) is built on.

Canonical labelling without building the trees: a rooted, unordered, labelled tree is determined
by its root label and the *multiset* of (edge label, child subtree) pairs. So the depth-k tree of
node v is the key ``(label(v), sorted((edge_label(v,u), id_{k-1}(u)) for u in N(v)))`` and a
:class:`TreeVocabulary` turns each distinct key into an integer id. Level by level this is exact
(isomorphic trees get one id, non-isomorphic ones different ids -- by induction on depth), costs
O(L * edges) instead of the exponential size of the unrolled trees, and leaves behind a DAG in
which each distinct subtree is stored once. :meth:`TreeVocabulary.canonical_string` gives a label
that does not depend on the order ids were handed out, and :meth:`TreeVocabulary.tree_graph`
unrolls an id back into an explicit tree (edges child -> parent, root first) for a GNN to train on.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import KdkitError


class GraphLabelError(KdkitError, ValueError):
    """A graph has no discrete node (or edge) labels, so its computation trees cannot be named."""


@dataclass
class LabelledGraph:
    """One graph with discrete labels: what computation-tree decomposition needs and nothing more.

    `edge_index` is (2, E) with both directions of each undirected edge, as torch-geometric stores it;
    `edge_labels[i]` labels `edge_index[:, i]`.
    """

    node_labels: np.ndarray
    edge_index: np.ndarray
    edge_labels: np.ndarray
    y: int

    @property
    def num_nodes(self) -> int:
        return int(self.node_labels.shape[0])


def _one_hot_to_index(matrix: np.ndarray, what: str, where: str) -> np.ndarray:
    """Row-wise index of the single 1 in a one-hot matrix; anything else is a `GraphLabelError`."""
    if matrix.ndim != 2 or matrix.shape[1] == 0:
        raise GraphLabelError(f"{where}: {what} must be a one-hot matrix (rows x labels), got shape "
                              f"{tuple(matrix.shape)}")
    ones = matrix == 1
    if not (np.all(ones | (matrix == 0)) and np.all(ones.sum(axis=1) == 1)):
        raise GraphLabelError(
            f"{where}: {what} is not one-hot (continuous or multi-hot values), so nodes/edges have no discrete "
            "label to build computation trees from. Mirage needs discrete labels: load the TU set without "
            "continuous attributes (use_node_attr=False, the default) or map features to integer labels first.")
    return ones.argmax(axis=1).astype(np.int64)


def labelled_graph_from_pyg(data, where: str = "graph") -> LabelledGraph:
    """A `LabelledGraph` from a torch-geometric `Data` whose `x` (and `edge_attr`, if any) are one-hot labels.

    A graph without `x`, or with continuous/multi-hot `x`, raises `GraphLabelError`. No `edge_attr`
    means every edge has label 0.
    """
    if getattr(data, "x", None) is None:
        raise GraphLabelError(f"{where} has no node features `x`; Mirage needs one-hot node labels in `x`")
    x = data.x.detach().cpu().numpy()
    node_labels = _one_hot_to_index(x, "node features x", where)
    edge_index = data.edge_index.detach().cpu().numpy().astype(np.int64)
    edge_attr = getattr(data, "edge_attr", None)
    if edge_attr is None or edge_index.shape[1] == 0:
        edge_labels = np.zeros(edge_index.shape[1], dtype=np.int64)
    else:
        ea = edge_attr.detach().cpu().numpy()
        edge_labels = _one_hot_to_index(ea.reshape(ea.shape[0], -1), "edge features edge_attr", where)
    y = data.y.view(-1)
    if y.numel() != 1:
        raise GraphLabelError(f"{where}: expected one graph label in y, got {y.numel()}")
    return LabelledGraph(node_labels, edge_index, edge_labels, int(y.item()))


def labelled_graphs(dataset) -> list[LabelledGraph]:
    """Every graph of a torch-geometric dataset (or list of `Data`) as a `LabelledGraph`."""
    if dataset and isinstance(dataset[0], LabelledGraph):
        return list(dataset)
    return [labelled_graph_from_pyg(d, where=f"graph {i}") for i, d in enumerate(dataset)]


@dataclass
class TreeVocabulary:
    """Integer ids for rooted labelled trees, shared by all graphs decomposed with it.

    Entry `i` is a node label and the sorted tuple of its children `(edge label, child tree id)`;
    children always have smaller ids, so the entries form a DAG in topological order.
    """

    node_label: list[int] = field(default_factory=list)
    children: list[tuple[tuple[int, int], ...]] = field(default_factory=list)
    _ids: dict = field(default_factory=dict, repr=False)
    _strings: dict = field(default_factory=dict, repr=False)
    _sizes: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.node_label)

    def id_of(self, label: int, children: tuple[tuple[int, int], ...]) -> int:
        """The id of the tree with root `label` and these (edge label, child id) pairs (sorted), new if unseen."""
        key = (label, children)
        i = self._ids.get(key)
        if i is None:
            i = len(self.node_label)
            self._ids[key] = i
            self.node_label.append(label)
            self.children.append(children)
        return i

    def canonical_string(self, tree_id: int) -> str:
        """`label(edge:child)(edge:child)...` with children sorted by their own strings: equal iff isomorphic,
        and independent of the order in which ids were assigned (so comparable across vocabularies)."""
        s = self._strings.get(tree_id)
        if s is None:
            parts = sorted(f"({e}:{self.canonical_string(c)})" for e, c in self.children[tree_id])
            s = f"{self.node_label[tree_id]}{''.join(parts)}"
            self._strings[tree_id] = s
        return s

    def num_nodes(self, tree_id: int) -> int:
        """Nodes of the unrolled tree."""
        n = self._sizes.get(tree_id)
        if n is None:
            n = 1 + sum(self.num_nodes(c) for _, c in self.children[tree_id])
            self._sizes[tree_id] = n
        return n

    def tree_graph(self, tree_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Unroll `tree_id`: (node labels, edge_index (2, n-1) child -> parent, edge labels); node 0 is the root.

        Edges point at the root so that message passing carries information from the leaves up, as in
        the GNN's own computation on the full graph.
        """
        labels, src, dst, elab = [self.node_label[tree_id]], [], [], []
        stack = [(tree_id, 0)]
        while stack:
            tid, pos = stack.pop()
            for e, child in self.children[tid]:
                cpos = len(labels)
                labels.append(self.node_label[child])
                src.append(cpos)
                dst.append(pos)
                elab.append(e)
                stack.append((child, cpos))
        return (np.asarray(labels, dtype=np.int64), np.asarray([src, dst], dtype=np.int64).reshape(2, -1),
                np.asarray(elab, dtype=np.int64))

    def subtree_closure(self, tree_ids) -> list[int]:
        """`tree_ids` and every subtree under them, in increasing id order (children before parents)."""
        seen, stack = set(), list(tree_ids)
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            stack.extend(c for _, c in self.children[t])
        return sorted(seen)


def _neighbours(graph: LabelledGraph) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR of incoming neighbours per node: (pointer, neighbour ids, edge labels), each node's run sorted."""
    n = graph.num_nodes
    src, dst = graph.edge_index
    order = np.lexsort((src, dst))
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.add.at(ptr, dst + 1, 1)
    return np.cumsum(ptr), src[order], graph.edge_labels[order]


def check_depth(depth) -> int:
    """`depth` as a positive int (the GNN's number of message-passing layers), else a clear error."""
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth <= 0:
        raise GraphLabelError(f"computation-tree depth L must be a positive integer (the GNN's number of layers), "
                              f"got {depth!r}")
    return int(depth)


def computation_tree_ids(graph: LabelledGraph, depth: int, vocab: TreeVocabulary) -> np.ndarray:
    """The id of every node's depth-`depth` computation tree (one per node, in node order)."""
    depth = check_depth(depth)
    ptr, nbr, elab = _neighbours(graph)
    labels = graph.node_labels.tolist()
    ids = [vocab.id_of(lab, ()) for lab in labels]
    nbr_l, elab_l, ptr_l = nbr.tolist(), elab.tolist(), ptr.tolist()
    for _ in range(depth):
        prev = ids
        ids = [vocab.id_of(labels[v], tuple(sorted((elab_l[j], prev[nbr_l[j]]) for j in range(ptr_l[v], ptr_l[v + 1]))))
               for v in range(len(labels))]
    return np.asarray(ids, dtype=np.int64)


def decompose(graphs, depth: int, vocab: TreeVocabulary | None = None) -> tuple[list[np.ndarray], TreeVocabulary]:
    """Each graph as the array of its nodes' computation-tree ids, and the vocabulary that names them."""
    depth = check_depth(depth)
    vocab = vocab if vocab is not None else TreeVocabulary()
    return [computation_tree_ids(g, depth, vocab) for g in labelled_graphs(graphs)], vocab
