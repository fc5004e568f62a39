"""The one run core every verb uses: run folder, resolved config, device, seeds, threads, logging, progress,
TensorBoard, checkpoints, resume and Ctrl-C.

Every run folder has the same layout:

    config.yaml           every resolved setting
    metrics.jsonl         one JSON row per log / evaluation (step, loss terms, metrics)
    metrics.json          the final summary (and the pillar's own tables)
    train.log             what the console showed, with times
    logs/                 TensorBoard scalars (when tensorboard is installed)
    checkpoints/step-N/   the one checkpoint format (`kdkit.checkpoint`), the newest `keep_checkpoints` kept
    ...                   the pillar's artefacts and pictures

The resume rule: `resume=auto` continues from the run folder's newest checkpoint (or starts fresh when there is
none), `resume=PATH` from that checkpoint or run folder. Each checkpoint stores the resolved config; resuming with
different settings is refused before anything is written, naming each key with its old and new value, except
the settings the verb lists as free to change (evaluation, logging, housekeeping).

Ctrl-C: inside `run.interruptible()` the first SIGINT only sets `run.interrupted`; the training loop then writes
a checkpoint at the current step and raises `Interrupted`, which the CLI turns into one line and exit code 130.
A second Ctrl-C stops at once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import checkpoint as ckpt
from .config import RunName, coerce, dump, show, to_plain
from .errors import CheckpointError, ConfigError, KdkitError


class Interrupted(KdkitError):
    """Ctrl-C during a run: a checkpoint was written at `step` (the CLI exits with code 130)."""

    def __init__(self, step: int, folder: Path | None, run_dir: Path):
        self.step, self.folder, self.run_dir = step, folder, run_dir
        where = f"checkpoint {folder}" if folder is not None else "no checkpoint (nothing to save yet)"
        super().__init__(f"interrupted at step {step}; {where}; continue with the same command and "
                         f"name={run_dir.name} resume=auto")


def pick_device(device: str = "auto") -> torch.device:
    """`auto`: CUDA when present, else CPU; `cuda` without a GPU is refused."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device} but no CUDA device is available; use device=cpu (or auto)")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state.get("cuda"):
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def run_folder(output_dir: str, name: str | None, default: str, key: str = "name") -> Path:
    """`output_dir/name`, or `output_dir/<default>-<time>`; `name` must stay inside `output_dir`."""
    if name is not None:
        coerce(name, RunName, key)
        return Path(output_dir) / name
    return Path(output_dir) / f"{default}-{time.strftime('%Y%m%d-%H%M%S')}"


def flat(d, prefix: str = "") -> dict:
    """Nested config -> {"a.b": value}."""
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out = {}
    for k, v in d.items():
        out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v}
    return out


def config_changes(old: dict, new: dict, may_change: tuple[str, ...], defaults: dict | None = None) -> list[str]:
    """`key: old -> new` for each setting that differs and may not change on resume. A key the old run's config
    lacks (an option added to kdkit since) reads as its default in `defaults`: the run behaved that way."""
    a, b = flat(old), flat(new)
    d = flat(defaults or {})
    a = {**{k: d[k] for k in b if k not in a and k in d}, **a}
    free = tuple(may_change)
    out = []
    for key in sorted(set(a) | set(b)):
        if key == free or any(key == f or key.startswith(f + ".") for f in free):
            continue
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            out.append(f"{key}: {show(a.get(key, '<unset>'))} -> {show(b.get(key, '<unset>'))}")
    return out


def _defaults(config) -> dict | None:
    """The config class's defaults (what an option missing from an older run's config meant), when it has them."""
    try:
        return to_plain(type(config)()) if dataclasses.is_dataclass(config) else None
    except TypeError:  # a config class with required fields
        return None


class Run:
    """One run folder and everything decided once for it. See the module docstring for the layout and rules."""

    def __init__(self, config, run_dir: Path, *, resume: str | None = None, seed: int = 0, device: str = "auto",
                 threads: int | None = None, progress: bool = True, keep_checkpoints: int = 2,
                 may_change: tuple[str, ...] = (), main: bool = True, barrier: Callable[[], None] | None = None,
                 tensorboard: bool = True, console: bool = True, agree: Callable[[bool], bool] | None = None):
        self.config, self.run_dir = config, Path(run_dir)
        self.resume, self.seed, self.device_name = resume, seed, device
        self.threads = threads or env_threads()
        self.show_progress, self.keep, self.may_change = progress, keep_checkpoints, tuple(may_change)
        self.main, self.barrier, self.console = main, barrier or (lambda: None), console
        self.use_tensorboard = tensorboard
        self.agree = agree  # several processes: True on every process when any of them saw Ctrl-C (a collective)
        self.interrupted = False
        self.resume_folder: Path | None = None
        self.device = pick_device(device)
        self._tb = None
        self._started = False

    # ------------------------------------------------------------ start

    def start(self) -> "Run":
        """Check the resume rule, then write config.yaml and fix seeds, threads and device (idempotent)."""
        if self._started:
            return self
        self.resume_folder = self.find_resume()
        if self.resume_folder is not None:
            self.check_same_settings(self.resume_folder)
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            removed = ckpt.clean_stale(self.run_dir)
            if removed:
                self.log(f"removed {len(removed)} temporary file(s) left by an interrupted write: {', '.join(removed)}")
            dump(self.config, self.run_dir / "config.yaml")
        if self.threads:
            torch.set_num_threads(self.threads)
        seed_everything(self.seed)
        self._started = True
        return self

    def find_resume(self) -> Path | None:
        """The checkpoint folder to resume from: `auto` (newest in this run folder, None when there is none yet)
        or a checkpoint folder or run folder given by path."""
        if not self.resume:
            return None
        where = self.run_dir if self.resume == "auto" else Path(self.resume)
        if (where / ckpt.MANIFEST).is_file():
            return where
        latest = ckpt.latest_checkpoint(where)
        if latest is None and self.resume != "auto":
            raise CheckpointError(f"resume={self.resume}: no checkpoint there (expected a checkpoint folder with "
                                  f"{ckpt.MANIFEST}, or a run folder with checkpoints/step-N/)")
        return latest

    def check_same_settings(self, folder: Path) -> None:
        """Before anything is written: the checkpoint is whole (checksums, a readable tensor file, a kdkit run's
        state) and was made with the same training settings, else refuse naming each change (old -> new)."""
        ckpt.verify(folder)
        ckpt.read_metadata(folder / "state.safetensors")  # the header only: a foreign or corrupt file is named
        try:
            saved = json.loads((folder / "state.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"checkpoint {folder}/state.json is corrupt ({e})") from e
        if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict) or "step" not in saved:
            raise CheckpointError(f"checkpoint {folder} was not written by a kdkit run (no step and config)")
        defaults = _defaults(self.config)
        changes = config_changes(saved["config"], to_plain(self.config), self.may_change, defaults)
        if changes:
            raise ConfigError(f"resume: {len(changes)} setting(s) differ from the run being resumed ({folder}): "
                              + "; ".join(changes) + ". Start a new run (another name=) or put them back"
                              + (f"; free to change: {', '.join(self.may_change)}" if self.may_change else ""))

    # ------------------------------------------------------------ logging

    def log(self, text: str) -> None:
        """One line in train.log (with the time) and on the console."""
        if not self.main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "train.log", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
        if self.console:
            from tqdm import tqdm

            tqdm.write(text)  # above a progress bar that is running, not inside its line
            sys.stdout.flush()

    def record(self, row: dict, step: int | None = None) -> None:
        """One row of metrics.jsonl (and its numbers as TensorBoard scalars)."""
        if not self.main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row, default=float) + "\n")
        tb = self.tensorboard()
        if tb is not None:
            at = step if step is not None else row.get("step", 0)
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    tb.add_scalar(k, v, at)

    def write_json(self, name: str, obj) -> Path:
        """A JSON file in the run folder, written atomically (metrics.json, the pillar's reports)."""
        path = self.run_dir / name
        if self.main:
            with ckpt.atomic_path(path) as tmp:
                tmp.write_text(json.dumps(obj, indent=1, default=_jsonable))
        return path

    def tensorboard(self):
        if not (self.use_tensorboard and self.main):
            return None
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: metrics.jsonl only
                self.use_tensorboard = False
                return None
            self._tb = SummaryWriter(str(self.run_dir / "logs"))
        return self._tb

    def progress(self, total: int, initial: int = 0, desc: str = ""):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0,
                    disable=not (self.show_progress and self.main))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    # ------------------------------------------------------------ checkpoints

    def save(self, step: int, state: dict) -> Path | None:
        """checkpoints/step-N/: the method's `state`, the config, the step and every RNG (main process only)."""
        folder = self.run_dir / "checkpoints" / f"step-{step:08d}"
        self.barrier()
        if self.main:
            ckpt.save_checkpoint(folder, {"step": step, "config": to_plain(self.config), "rng": rng_state(),
                                          "method": state})
            ckpt.prune_checkpoints(self.run_dir, self.keep)
        self.barrier()
        return folder

    def restore(self) -> tuple[int, dict] | None:
        """(step, method state) of the resume checkpoint, with every RNG put back; None for a fresh run."""
        self.start()
        if self.resume_folder is None:
            return None
        full = ckpt.load_checkpoint(self.resume_folder)
        if "method" not in full or "step" not in full:
            raise CheckpointError(f"checkpoint {self.resume_folder} was not written by a kdkit run")
        set_rng_state(full["rng"])
        self.log(f"resumed from {self.resume_folder} at step {full['step']}")
        return int(full["step"]), full["method"]

    # ------------------------------------------------------------ Ctrl-C

    def stop_requested(self, due: bool) -> bool:
        """Whether the loop should stop for Ctrl-C. One process: at once. Several: only at `due` steps (the same on
        every process: logging and checkpoint steps), where they agree through one collective, so all stop at
        the same step."""
        if self.agree is None:
            return self.interrupted
        return due and self.agree(self.interrupted)

    @contextlib.contextmanager
    def interruptible(self):
        """The first SIGINT sets `self.interrupted` (the loop saves and stops); a second one stops at once."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum, frame):
            if self.interrupted:
                raise KeyboardInterrupt
            self.interrupted = True

        old = signal.signal(signal.SIGINT, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, old)


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    return str(v)


def env_threads() -> int | None:
    """KDKIT_THREADS, when set (tests and benchmarks pin threads without editing recipes)."""
    v = os.environ.get("KDKIT_THREADS")
    return int(v) if v and v.isdigit() and int(v) > 0 else None
