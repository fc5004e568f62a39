"""Training throughput (images/s) of KD, ResNet-32x4 -> ResNet-8x4 by default, against the student alone,
against the straightforward PyTorch loop (`plain`, see `plain_loop.py`) and against mdistiller's own trainer and
distiller code (`mdistiller`, see `mdistiller_loop.py`; skipped with one line when `.refs/mdistiller` is absent).

Everything runs in the same process on real CIFAR-10 batches: kdkit variants through the real `Distiller`
loop (fp32, bf16 autocast, channels_last, torch.compile, and `fast` = all three; on a GPU the data and the
augmentation are GPU-resident), so the ratios say what the teacher costs and what kdkit's loop gains.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..config import PositiveInt, bad_value, load_recipe
from ..errors import ConfigError
from .results import RESULTS_DIR, bench_options, read_results, write_result

VARIANTS = {
    "plain": None,  # the straightforward PyTorch loop, not the Distiller
    "mdistiller": None,  # mdistiller's KD and train_iter, from a fetched copy in .refs/mdistiller
    "fp32": [],
    "bf16": ["trainer.mixed_precision=bf16"],
    "channels_last": ["trainer.channels_last=true"],
    "bf16_channels_last": ["trainer.mixed_precision=bf16", "trainer.channels_last=true"],  # the CPU protocol's
    "compile": ["trainer.compile=true"],
    "fast": ["trainer.mixed_precision=bf16", "trainer.channels_last=true", "trainer.compile=true"],
}
CIFAR_TRAIN = 50_000
REFS = (("plain", "kd_over_plain_kd"), ("mdistiller", "kd_over_mdistiller_kd"))  # the loops kdkit is measured against


@dataclass
class ThroughputOptions:
    """`kdkit bench throughput [key=value ...]`."""

    teacher: str = "resnet32x4"
    student: str = "resnet8x4"
    batch: PositiveInt = 64
    steps: PositiveInt = 20  # timed optimiser steps
    warmup: PositiveInt = 5  # untimed steps before them (the first stamp starts the clock)
    variants: str = "plain,mdistiller,fp32,bf16,channels_last"  # comma list of VARIANTS
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = None
    out: str | None = None  # result folder (default: leaderboards/results/throughput, and the table)

    def validate(self, at: str) -> None:
        from ..models import check_model

        for v in self.names():
            if v not in VARIANTS:
                raise bad_value(f"{at}variants", self.variants, f"a comma list of {', '.join(VARIANTS)}")
        check_model(self.teacher, {}, "teacher")
        check_model(self.student, {}, "student")
        if (self.steps + self.warmup) * self.batch > CIFAR_TRAIN:
            raise ConfigError(f"(steps + warmup) * batch = {(self.steps + self.warmup) * self.batch} images: more than "
                              f"CIFAR-10's {CIFAR_TRAIN:,} training images; lower steps, warmup or batch")

    def names(self) -> list[str]:
        return [v for v in self.variants.split(",") if v]


def recipe_for(batch: int, steps: int, warmup: int, overrides: list[str]):
    """The one-epoch CIFAR-10 recipe a kdkit variant times (validated before any work)."""
    per_class = math.ceil((steps + warmup) * batch / 10)
    return load_recipe("cifar10-240ep", [f"data.batch_size={batch}", f"data.train_per_class={per_class}",
                                         "data.test_limit=64", "trainer.epochs=1", "trainer.progress=false",
                                         "output_dir=runs/bench", "name=throughput", *overrides]), per_class


def measure(teacher: str | None, student: str, batch: int, steps: int, warmup: int, overrides: list[str]) -> float:
    """Images/s over `steps` optimiser steps after `warmup` steps, KD (teacher set) or CE only."""
    from ..data import load_dataset_by_name
    from ..data.subsets import balanced_subset
    from ..losses import KDLoss
    from ..models import build_model
    from ..train.distiller import Distiller

    recipe, per_class = recipe_for(batch, steps, warmup, overrides)
    train, test = load_dataset_by_name("cifar10", "train"), load_dataset_by_name("cifar10", "test")
    stamps: list[float] = []
    t_model = build_model(teacher) if teacher else None
    losses = {"kd": (0.9, KDLoss(T=4.0))} if teacher else {}
    recipe.ce_weight = 0.1 if teacher else 1.0
    d = Distiller(build_model(student), t_model, losses, train, test, recipe, Path("runs/bench/throughput"),
                  train_indices=balanced_subset(train.labels, per_class),
                  on_step=lambda _d, _s: stamps.append(time.perf_counter()))
    if d.accelerator.device.type == "cuda":
        import torch

        d.on_step = lambda _d, _s: (torch.cuda.synchronize(), stamps.append(time.perf_counter()))
    d.fit()
    timed = stamps[warmup - 1:]
    return (len(timed) - 1) * batch / (timed[-1] - timed[0])


def run_throughput(settings: list[str]) -> dict:
    opts = bench_options(ThroughputOptions, settings)
    extra = {v: VARIANTS[v] + ([f"trainer.compile_mode={opts.compile_mode}"] if opts.compile_mode else [])
             for v in opts.names() if VARIANTS[v] is not None}
    for overrides in extra.values():  # every recipe a variant runs, validated before the first measurement
        recipe_for(opts.batch, opts.steps, opts.warmup, overrides)
    rows = []
    for variant in opts.names():
        args = (opts.batch, opts.steps, opts.warmup)
        if variant == "plain":
            from .plain_loop import measure_plain as timer
        elif variant == "mdistiller":
            from .mdistiller_loop import measure_mdistiller as timer, missing

            if why := missing():
                print(f"{variant:>14}: {why}", flush=True)
                continue
        else:
            timer = lambda teacher, student, *a: measure(teacher, student, *a, extra[variant])
        alone, kd = timer(None, opts.student, *args), timer(opts.teacher, opts.student, *args)
        rows.append({"variant": variant, "student_alone_img_s": alone, "kd_img_s": kd, "kd_over_alone": kd / alone})
        _add_ratios(rows)
        vs = "".join(f"   KD vs {ref} {rows[-1][key]:.2f}x" for ref, key in REFS if key in rows[-1])
        print(f"{variant:>14}: student alone {alone:8.1f} img/s   KD {kd:8.1f} img/s   ratio {kd / alone:.2f}{vs}",
              flush=True)
    if not rows:  # every variant skipped
        return {"rows": rows, "path": None}
    path = write_result("throughput", {"teacher": opts.teacher, "student": opts.student, "batch": opts.batch,
                                       "steps": opts.steps, "compile_mode": opts.compile_mode, "rows": rows},
                        Path(opts.out) if opts.out else None)
    print(f"wrote {path}")
    if not opts.out:
        write_markdown()
    return {"rows": rows, "path": str(path)}


def write_markdown() -> Path:
    """leaderboards/throughput.md from every throughput result file."""
    lines = ["# Training throughput: KD vs the student alone", "",
             "Generated by `kdkit bench throughput` from `leaderboards/results/throughput/*.json`; "
             "images/s of the full `Distiller` step on real CIFAR-10 batches (augmentation included). The last ratios are "
             "KD images/s over the plain PyTorch loop's and over mdistiller's own `train_iter` with its `KD` "
             "(goals: at least 1.0x and 1.3x).", "",
             "| device | threads | teacher → student | batch | variant | student alone (img/s) | KD (img/s) | KD / alone "
             "| KD vs plain PyTorch loop | KD vs mdistiller | commit | command |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in read_results("throughput"):
        hw = r["hardware"]
        for row in r["rows"]:
            lines.append(f"| {hw['device']} ({hw['cpu']}) | {hw['threads']} | {r['teacher']} → {r['student']} | "
                         f"{r['batch']} | {row['variant']} | {row['student_alone_img_s']:.1f} | {row['kd_img_s']:.1f} "
                         f"| {row['kd_over_alone']:.2f} | {_ratio(row, 'kd_over_plain_kd')} "
                         f"| {_ratio(row, 'kd_over_mdistiller_kd')} | {r['git_commit']} | `{r['command']}` |")
    path = RESULTS_DIR.parent / "throughput.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _add_ratios(rows: list[dict]) -> None:
    """Every row's KD (and student-alone) img/s over the plain loop's and mdistiller's, once those are measured."""
    by = {row["variant"]: row for row in rows}
    for ref, key in REFS:
        if ref in by:
            for row in rows:
                row[key] = row["kd_img_s"] / by[ref]["kd_img_s"]
                row[f"alone_over_{ref}_alone"] = row["student_alone_img_s"] / by[ref]["student_alone_img_s"]


def _ratio(row: dict, key: str) -> str:
    return f"{row[key]:.2f}x" if key in row else "-"
