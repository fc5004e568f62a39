"""`kdkit bench classifier`: one command per leaderboard row (a method on a teacher->student pair, N seeds).

Each seed is a real `kdkit train` / `kdkit distill` run in its own process (several at once with `jobs=N`, so a
GPU is shared by small runs); each writes one result file, `leaderboards/results/classifier-cifar10/*.json`,
with its accuracy, protocol, teacher checkpoint hash and the command that reproduces the row.
`epochs=E` (< 240) runs a *shorter protocol*: the LR milestones 150/180/210 and any loss warm-up are scaled by
E/240, and the leaderboard shows such rows in their own table, never extrapolated.

`protocol=cpu` is the CPU protocol (recipes `cpu-*`: AirNet teacher and small students, all 50,000 images, 20
epochs of a one-cycle schedule, bf16): its own recipes, its own table, epochs as the recipes set them. A seed
whose result file has the same command, teacher hash and resolved recipe (`recipe_digest`) is skipped, so an
interrupted row resumes where it stopped and a changed recipe reruns.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..checkpoint import sha256
from ..config import ExistingPath, NonNegInt, PositiveInt, list_recipes, load_recipe
from ..errors import ConfigError, KdkitError
from .results import REPO, RESULTS_DIR, bench_options, git_commit, hardware, keep_weights

KIND = "classifier-cifar10"
STANDARD_EPOCHS = 240
MILESTONES = (150, 180, 210)
# CRD / mdistiller protocol: the light-weight students train with LR 0.01 instead of 0.05.
STUDENT_LR = {"shufflenetv2": 0.01, "mobilenetv2": 0.01}
FAST = ["trainer.mixed_precision=bf16", "trainer.channels_last=true", "trainer.compile=true"]


@dataclass
class ClassifierBenchOptions:
    """`kdkit bench classifier method=NAME pair=TEACHER-STUDENT [key=value ...] [recipe overrides a.b=v ...]`."""

    method: str | None = None  # teacher, baseline, or a distillation method with a recipe (kd, dkd, ...)
    pair: str | None = None  # TEACHER-STUDENT, e.g. resnet32x4-resnet8x4
    seeds: PositiveInt = 3
    seed0: NonNegInt = 0  # the first seed
    epochs: PositiveInt | None = None  # standard: 240, or fewer for a shorter protocol; cpu: as the recipes set it
    protocol: Literal["standard", "cpu"] = "standard"
    jobs: PositiveInt = 1  # runs at once
    teacher: ExistingPath | None = None  # a teacher checkpoint instead of the newest recorded teacher row
    fast: Literal["auto"] | bool = "auto"  # bf16 + channels_last + compile (auto: on CUDA)
    runs: str = "runs/bench-classifier"
    out: str | None = None  # result folder (default: leaderboards/results/classifier-cifar10, and the table)

    def validate(self, at: str) -> None:
        if not self.method or not self.pair:
            raise ConfigError("kdkit bench classifier needs method=NAME and pair=TEACHER-STUDENT")
        method_recipe(self.method, *parse_pair(self.pair), self.protocol)  # an unknown method or model, named


def parse_pair(pair: str) -> tuple[str, str]:
    from ..models import model_names

    parts = str(pair).split("-")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"pair must be TEACHER-STUDENT, e.g. resnet32x4-resnet8x4; got {pair!r}")
    known = set(model_names())
    for p in parts:
        if p not in known:
            raise ConfigError(f"unknown model {p!r} in pair {pair!r}; models: {', '.join(sorted(known))}")
    return parts[0], parts[1]


def protocol_overrides(epochs: int, recipe) -> list[str]:
    """The standard protocol scaled to `epochs`: milestones and loss warm-ups times epochs/240."""
    if epochs == STANDARD_EPOCHS:
        return []
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    scale = epochs / STANDARD_EPOCHS
    out = [f"trainer.epochs={epochs}",
           "scheduler.milestones=[" + ",".join(str(max(1, round(m * scale))) for m in MILESTONES) + "]"]
    for name, entry in recipe.losses.items():
        if entry and "warmup" in entry:
            out.append(f"losses.{name}.warmup={max(1, round(float(entry['warmup']) * scale))}")
    return out


def method_recipe(method: str, teacher: str, student: str, protocol: str = "standard") -> tuple[str, str, list[str]]:
    """(kdkit verb, recipe name, overrides) for `method` on the pair: a pair-specific recipe
    `{method}-{teacher}-{student}` when there is one, else the method's ResNet-32x4 -> ResNet-8x4 recipe with the
    models swapped. The CPU protocol's recipes are `cpu-train-{teacher}`, `cpu-cifar10` (the no-teacher
    baseline) and `cpu-{method}`."""
    names = set(list_recipes())
    if protocol == "cpu":
        if method == "teacher":
            name = f"cpu-train-{teacher}"
            return "train", (name if name in names else "cpu-cifar10"), [f"student.model={teacher}"]
        if method == "baseline":
            return "train", "cpu-cifar10", [f"student.model={student}"]
        if f"cpu-{method}" in names:
            return "distill", f"cpu-{method}", [f"teacher.model={teacher}", f"student.model={student}"]
        methods = sorted(n[4:] for n in names if n.startswith("cpu-") and n not in ("cpu-cifar10",)
                         and not n.startswith("cpu-train-"))
        raise ConfigError(f"unknown method {method!r} for protocol=cpu; choices: teacher, baseline, "
                          f"{', '.join(methods)}")
    if method == "teacher":
        name = f"train-{teacher}"
        return "train", (name if name in names else "cifar10-240ep"), [f"student.model={teacher}"]
    lr = [f"optim.lr={STUDENT_LR[student]}"] if student in STUDENT_LR else []
    if method == "baseline":
        name = f"baseline-{student}"
        return "train", (name if name in names else "cifar10-240ep"), [f"student.model={student}", *lr]
    for name in (f"{method}-{teacher}-{student}", f"{method}-resnet32x4-resnet8x4"):
        if name in names:
            return "distill", name, [f"teacher.model={teacher}", f"student.model={student}", *lr]
    methods = sorted({n.rsplit("-", 2)[0] for n in names if n.endswith("-resnet32x4-resnet8x4")})
    raise ConfigError(f"unknown method {method!r}; choices: teacher, baseline, {', '.join(methods)}")


def results_dir(out: str | None = None) -> Path:
    return Path(out) if out else RESULTS_DIR / KIND


def read_rows(out: str | None = None) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results_dir(out).glob("*.json"))]


def find_teacher(arch: str, out: str | None = None, protocol: str = "standard") -> dict | None:
    """The newest teacher result for `arch` under `protocol` whose checkpoint still exists with the recorded hash."""
    for row in sorted(read_rows(out), key=lambda r: r["time"], reverse=True):
        if row["method"] == "teacher" and row["student"] == arch and row.get("protocol", "standard") == protocol:
            path = REPO / row["checkpoint"]["path"]  # a kept teacher's path is relative to the repository
            if path.is_file() and sha256(path) == row["checkpoint"]["sha256"]:
                return row | {"checkpoint": {**row["checkpoint"], "path": str(path)}}
    return None


def recipe_digest(recipe) -> str:
    """What a seed's run trains, as a hash of its resolved recipe without the teacher file's place: a finished seed
    is reused only while its recipe still says the same (a changed recipe value reruns it)."""
    import hashlib

    settings = recipe.to_dict()
    settings["teacher"] = {k: v for k, v in settings["teacher"].items() if k != "checkpoint"}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def result_path(opts: ClassifierBenchOptions, epochs: int, seed: int) -> Path:
    cpu = "__cpu" if opts.protocol == "cpu" else ""
    return results_dir(opts.out) / f"{opts.method}__{opts.pair}{cpu}__e{epochs}__s{seed}.json"


def bench_command(opts: ClassifierBenchOptions, overrides: list[str]) -> str:
    defaults = ClassifierBenchOptions(method=opts.method, pair=opts.pair)
    keys = ["method", "pair", "seeds"] + [k for k in ("protocol", "epochs", "seed0", "teacher")
                                          if getattr(opts, k) != getattr(defaults, k)]
    return "kdkit bench classifier " + " ".join([f"{k}={getattr(opts, k)}" for k in keys] + overrides)


def _launch(cmd: list[str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


def run_classifier(settings: list[str]) -> list[dict]:
    extra = [s for s in settings if "." in s.partition("=")[0]]  # recipe overrides, passed through verbatim
    opts = bench_options(ClassifierBenchOptions, [s for s in settings if s not in extra])
    t_arch, s_arch = parse_pair(opts.pair)
    verb, recipe_name, overrides = method_recipe(opts.method, t_arch, s_arch, opts.protocol)
    overrides += extra
    recipe = load_recipe(recipe_name, overrides)
    if opts.protocol == "cpu":
        if opts.epochs is not None:
            overrides.append(f"trainer.epochs={opts.epochs}")
    else:
        overrides += protocol_overrides(opts.epochs or STANDARD_EPOCHS, recipe)
    epochs = load_recipe(recipe_name, overrides).trainer.epochs
    import torch

    fast = opts.fast == "auto" and torch.cuda.is_available() or opts.fast is True
    if fast:
        overrides += FAST
    teacher_row = None
    if verb == "distill":
        if opts.teacher:
            path = Path(opts.teacher)
            path = path / "model.safetensors" if path.is_dir() else path
            if not path.is_file():
                raise ConfigError(f"teacher={opts.teacher}: no such checkpoint")
            teacher_row = {"checkpoint": {"path": str(path), "sha256": sha256(path)}, "final_acc": None,
                           "epochs": None}
        else:
            teacher_row = find_teacher(t_arch, opts.out, opts.protocol)
            if teacher_row is None:
                first = f"protocol={opts.protocol}" if opts.protocol != "standard" else f"epochs={epochs}"
                raise KdkitError(f"no trained {t_arch} teacher recorded in {results_dir(opts.out)}: run "
                                 f"`kdkit bench classifier method=teacher pair={opts.pair} seeds=1 "
                                 f"{first}` first, or pass teacher=PATH")
        overrides.append(f"teacher.checkpoint={teacher_row['checkpoint']['path']}")
    from ..train.build import check_recipe

    resolved = load_recipe(recipe_name, overrides)
    check_recipe(resolved, verb)  # what each seed's run checks, before any of them
    digest = recipe_digest(resolved)

    seeds, jobs = opts.seeds, opts.jobs
    command = bench_command(opts, extra)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    procs: list[tuple[int, str, subprocess.Popen]] = []
    rows, pending = [], []
    for seed in range(opts.seed0, opts.seed0 + seeds):
        done = result_path(opts, epochs, seed)
        row = json.loads(done.read_text()) if done.is_file() else {}
        same_teacher = (row.get("teacher_checkpoint") or {}).get("sha256") == (
            teacher_row["checkpoint"]["sha256"] if teacher_row else None)
        if row.get("command") == command and same_teacher and row.get("recipe_digest") == digest:
            print(f"[seed {seed}] done before: {done}", flush=True)
            rows.append(row)
        else:
            pending.append(seed)
    while pending or procs:
        while pending and len(procs) < jobs:
            seed = pending.pop(0)
            name = f"{opts.method}-{opts.pair}-{opts.protocol}-e{epochs}-s{seed}-{stamp}"
            cmd = [sys.executable, "-m", "kdkit.cli", verb, f"recipe={recipe_name}", *overrides,
                   f"trainer.seed={seed}", f"name={name}", f"output_dir={opts.runs}", "trainer.progress=false"]
            print(f"[seed {seed}] {' '.join(cmd[2:])}", flush=True)
            procs.append((seed, name, _launch(cmd, Path(opts.runs) / f"{name}.log")))
        time.sleep(2)
        for item in list(procs):
            seed, name, proc = item
            if proc.poll() is None:
                continue
            procs.remove(item)
            run_dir = Path(opts.runs) / name
            if proc.returncode != 0:
                print(f"[seed {seed}] FAILED (exit {proc.returncode}); log: {run_dir}.log", flush=True)
                continue
            rows.append(_record(opts, command, verb, recipe_name, overrides, seed, run_dir, t_arch, s_arch,
                                epochs, fast, teacher_row, digest))
    if len(rows) != seeds:
        raise KdkitError(f"{seeds - len(rows)} of {seeds} runs failed; see the logs in {opts.runs}")
    accs = [r["final_acc"] for r in rows]
    print(f"{opts.method} {opts.pair} ({epochs} epochs): final test acc " +
          ", ".join(f"{a:.2f}" for a in accs))
    if not opts.out:
        print(f"wrote {write_markdown()}")
    return rows


def _record(opts, command, verb, recipe_name, overrides, seed, run_dir: Path, t_arch, s_arch, epochs, fast,
            teacher_row, digest) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    summary = metrics["summary"]
    weights = run_dir / "model.safetensors"
    row = {
        "kind": KIND, "method": opts.method, "pair": opts.pair, "teacher": t_arch,
        "student": t_arch if opts.method == "teacher" else s_arch, "seed": seed, "epochs": epochs,
        "protocol": opts.protocol, "shorter_protocol": opts.protocol == "standard" and epochs != STANDARD_EPOCHS,
        "fast": bool(fast),
        "final_acc": summary["final_acc"], "best_acc": summary["best_acc"],
        "teacher_acc": summary.get("teacher_acc"), "train_seconds": summary["train_seconds"],
        "images_per_s": summary["images_per_s"], "run_dir": str(run_dir),
        "checkpoint": {"path": str(keep_weights(weights) if opts.method == "teacher" and opts.protocol == "cpu"
                                   else weights), "sha256": sha256(weights)},
        "teacher_checkpoint": teacher_row["checkpoint"] if teacher_row else None,
        "teacher_epochs": teacher_row.get("epochs") if teacher_row else None,
        "command": command, "recipe_digest": digest, "run_command": f"kdkit {verb} recipe={recipe_name} " + " ".join(overrides) +
        f" trainer.seed={seed}", "git_commit": git_commit(),
        "hardware": hardware(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    path = result_path(opts, epochs, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=1))
    print(f"[seed {seed}] final {row['final_acc']:.2f}% best {row['best_acc']:.2f}% "
          f"({row['train_seconds']:.0f} s, {row['images_per_s']:.0f} img/s)", flush=True)
    return row


def write_markdown(out: str | None = None, path: Path | None = None) -> Path:
    """The leaderboard, and beside it (`figures/`) the CPU protocol's bar chart that the table links to."""
    from .classifier_table import FIGURE, render, write_figure

    path = path or RESULTS_DIR.parent / f"{KIND}.md"
    rows = read_rows(out)
    path.write_text(render(rows))
    figure = path.parent / FIGURE
    figure.parent.mkdir(parents=True, exist_ok=True)
    write_figure(rows, figure)
    return path
