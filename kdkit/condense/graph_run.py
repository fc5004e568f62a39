"""Graph condensation from Python, as `kdkit condense nci1 --method mirage ...` runs it: build the config, run it.

    cfg = build_config("nci1", ["epochs=50"], gnns="gcn,gin", seeds=5)
    metrics = run_graph_condense(cfg)          # metrics["summary"]["gcn/mirage/test_auc"] = {"mean", "std", "n"}

The run folder holds `config.yaml`, `metrics.json` (every seed, and mean ± std), `metrics.jsonl` (one row per
seed), `train.log`, `checkpoints/step-N/` (after each seed: a rerun with `resume=auto` continues with the next
seed) and the condensed sets (`mirage-seed{s}.safetensors`). What a seed does: `graph_method.py`.
"""
from __future__ import annotations

from .graph_config import BASELINES, GraphCondenseConfig
from .graph_method import random_subset_by_bytes, stratified_split
from .mirage import MirageDataset
from .resolve import as_setting, load_condense_config
from .run import run_condense

__all__ = ["BASELINES", "GraphCondenseConfig", "build_config", "load_condensed", "random_subset_by_bytes",
           "run_graph_condense", "stratified_split"]


def build_config(dataset: str, settings: list[str] | dict | None = None, **kwargs) -> GraphCondenseConfig:
    """A checked config: the dataset's recipe, then `key=value` settings (or a dict), then keyword arguments."""
    if isinstance(settings, dict):
        settings = [as_setting(k, v) for k, v in settings.items()]
    method = kwargs.pop("method", None)
    return load_condense_config(dataset, method, settings, **kwargs)


def run_graph_condense(cfg: GraphCondenseConfig, dataset=None) -> dict:
    """Run `cfg` and return (and write) its metrics; `dataset` replaces loading the TU set by name."""
    return run_condense(cfg, graphs=dataset)


def load_condensed(path) -> MirageDataset:
    """A Mirage dataset saved by a run (`mirage-seed{s}.safetensors`)."""
    return MirageDataset.load(path)
