"""`kdkit condense DATASET --method M`: a validated config, the method's factory, one `Run`, `fit`.

Every bad setting is refused while the config is built and the factory checks its options, before the run
folder is touched or any data loads. The run folder has kdkit's one layout (`kdkit/run.py`): `config.yaml`,
`metrics.jsonl`, `metrics.json` (the evaluation), `train.log`, `checkpoints/step-N/`, and the method's artefacts.
`resume=auto` (the default) continues the folder's newest checkpoint exactly, and refuses one made with other
training settings; `resume=false` starts over (the old checkpoints are removed first).
"""
from __future__ import annotations

import shutil

from .. import checkpoint as ckpt
from ..method import build_method, fit
from ..run import Run
from .catalog import KINDS, dataset_kind, method_factory
from .context import CondenseContext
from .resolve import load_condense_config

__all__ = ["KINDS", "condense", "dataset_kind", "run_condense"]


def condense(dataset: str, method: str | None = "mirage", settings: list[str] | None = None, **options) -> dict:
    """Run condensation `method` on `dataset` with `key=value` settings (and settings given as Python values,
    `ipc=10`); returns the run's metrics, with `run_dir`."""
    return run_condense(load_condense_config(dataset, method, settings, **options))


def run_condense(cfg, *, splits=None, graphs=None) -> dict:
    """Run a validated config (an `ImageCondenseConfig` or `GraphCondenseConfig`); `splits` / `graphs` replace
    loading the dataset by name."""
    factory = method_factory(dataset_kind(cfg.dataset), cfg.dataset, cfg.method)
    method = build_method("condense", cfg.method, CondenseContext(cfg, splits=splits, graphs=graphs), cfg.options)
    resume = "auto" if cfg.resume is True else (cfg.resume or None)
    may_change = cfg.RESUME_MAY_CHANGE + tuple(f"options.{k}" for k in factory.resume_may_change)
    run = Run(cfg, cfg.run_dir(), resume=resume, threads=cfg.threads,
              keep_checkpoints=cfg.keep_checkpoints, may_change=may_change, **cfg.run_options())
    if resume is None:
        start_over(run)
    return fit(run, method)


def start_over(run: Run) -> None:
    """`resume=false` in a folder that holds a run: its checkpoints and metrics go, so nothing mixes with them."""
    old = ckpt.checkpoint_folders(run.run_dir)
    if old:
        shutil.rmtree(run.run_dir / "checkpoints", ignore_errors=True)
        (run.run_dir / "metrics.jsonl").unlink(missing_ok=True)
        run.log(f"resume=false: removed the {len(old)} checkpoint(s) and metrics.jsonl of the previous run")
