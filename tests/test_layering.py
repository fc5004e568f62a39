"""No package imports a higher layer (`kdkit/layers.py`), and kdkit's import graph has no circles, lazy imports
inside functions included."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import import_graph  # noqa: E402

from kdkit.layers import LAYERS  # noqa: E402


def test_every_package_has_a_layer_and_imports_none_above_it():
    graph = import_graph.package_graph()
    assert sorted(set(graph) - {"kdkit"} - {p for row in LAYERS for p in row}) == []
    assert import_graph.upward(graph, LAYERS) == []


def test_no_import_circles():
    assert import_graph.cycles(import_graph.package_graph()) == []
    assert import_graph.cycles(import_graph.module_graph()) == []
