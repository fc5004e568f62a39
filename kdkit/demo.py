"""`kdkit demo`: teacher, KD student and no-teacher student on real CIFAR-10, small enough for a 2-core CPU."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .config import load_recipe
from .train.build import run_recipe

STEPS = (
    ("teacher", "train", "demo-teacher"),
    ("student + KD", "distill", "demo-kd"),
    ("student alone", "train", "demo-baseline"),
)


def run_demo(quick: bool = False, output_dir: str = "runs/demo") -> dict:
    """Run the three demo recipes in order and print their test accuracies side by side."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    extra = ["trainer.epochs=1", "data.train_per_class=50", "data.test_limit=500"] if quick else []
    shutil.rmtree(output_dir, ignore_errors=True)  # each demo starts fresh
    results, t0 = {}, time.perf_counter()
    teacher_dir = None
    for label, mode, name in STEPS:
        overrides = [f"output_dir={output_dir}", f"name={name}", *extra]
        if mode == "distill":
            overrides.append(f"teacher.checkpoint={teacher_dir}")
        recipe = load_recipe(name, overrides)
        console.rule(f"[bold]{label}[/]: kdkit {mode} recipe={name}")
        run_dir, summary = run_recipe(recipe, mode, name)  # checked before any work, like `kdkit train|distill`
        opts = ", ".join(f"{k}={v}" for k, v in recipe.student.options.items())
        results[label] = {"recipe": name, "model": f"{recipe.student.model}({opts})" if opts else
                          recipe.student.model, **summary}
        if mode == "train" and label == "teacher":
            teacher_dir = run_dir
    minutes = (time.perf_counter() - t0) / 60
    table = Table(title=f"kdkit demo: CIFAR-10 test accuracy ({minutes:.1f} min, "
                        f"{'quick' if quick else 'small'} demo - see recipes/ for full runs)")
    for col in ("run", "model", "train images", "epochs", "test acc (%)"):
        table.add_column(col)
    for label, r in results.items():
        rec = load_recipe(r["recipe"], extra)
        n = "all" if rec.data.train_per_class is None else f"{rec.data.train_per_class * 10:,}"
        table.add_row(label, r["model"], n, str(r["epochs"]), f"{r['final_acc']:.2f}")
    console.print(table)
    gain = results["student + KD"]["final_acc"] - results["student alone"]["final_acc"]
    console.print(f"KD gain over the same student without a teacher: [bold]{gain:+.2f}[/] points")
    out = Path(output_dir) / "demo.json"
    out.write_text(json.dumps({"minutes": minutes, "quick": quick, "results": results}, indent=1))
    console.print(f"results: {out}; run folders (config, metrics, curves.png, TensorBoard logs) in {output_dir}/")
    return results
