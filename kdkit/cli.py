"""The `kdkit` command: each verb maps to one pillar entry point; recipes take `key=value` overrides."""
from __future__ import annotations

import argparse
import sys

from .errors import KdkitError

EPILOG = """examples:
  kdkit recipes
  kdkit train recipe=train-resnet32x4
  kdkit distill recipe=kd-resnet32x4-resnet8x4 teacher.checkpoint=runs/train-resnet32x4-... trainer.epochs=240
  kdkit distill recipe=dkd-resnet32x4-resnet8x4 losses.dkd.beta=8 trainer.mixed_precision=bf16
  kdkit bench classifier method=dkd pair=resnet32x4-resnet8x4 seeds=3
  accelerate launch --num_processes 2 -m kdkit.cli distill recipe=...   (several processes, DDP)
"""


def _split_recipe(args: list[str]) -> tuple[str | None, list[str]]:
    recipe, rest = None, []
    for a in args:
        if a.startswith("recipe="):
            recipe = a.partition("=")[2]
        else:
            rest.append(a)
    return recipe, rest


def _run(mode: str, ns) -> int:
    from .config import load_recipe
    from .train.build import build_distiller, check_mode

    recipe_name, overrides = _split_recipe(ns.settings)
    if recipe_name is None:
        raise KdkitError(f"`kdkit {mode}` needs recipe=NAME (see `kdkit recipes`)")
    recipe = load_recipe(recipe_name, overrides)
    if ns.dry_run:
        import yaml

        check_mode(recipe, mode)
        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
        return 0
    distiller = build_distiller(recipe, mode, recipe_name)
    summary = distiller.fit()
    if distiller.accelerator.is_main_process:
        print(f"run folder: {distiller.run_dir}")
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return 0


def _recipes(ns) -> int:
    from rich.console import Console
    from rich.table import Table

    from .config import list_recipes, recipe_description
    from .losses import LOSSES
    from .models import model_names

    console = Console()
    table = Table("recipe", "description", title="kdkit recipes (kdkit distill|train recipe=NAME)")
    for name in list_recipes():
        table.add_row(name, recipe_description(name))
    console.print(table)
    console.print(f"[bold]models[/]: {', '.join(model_names())}, timm:<name>")
    console.print(f"[bold]losses[/]: {', '.join(LOSSES.names())}")
    return 0


def _demo(ns) -> int:
    from .demo import run_demo

    run_demo(quick=ns.quick)
    return 0


def _bench(ns) -> int:
    if ns.what == "throughput":
        from .bench.throughput import run_throughput

        run_throughput(ns.settings)
    elif ns.what == "classifier":
        from .bench.classifier import run_classifier

        run_classifier(ns.settings)
    elif ns.what == "classifier-table":
        from .bench.classifier import write_markdown

        if ns.settings:
            raise KdkitError("`kdkit bench classifier-table` takes no settings")
        print(f"wrote {write_markdown()}")
    else:
        raise KdkitError(f"unknown benchmark '{ns.what}'; choices: throughput, classifier, classifier-table")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdkit", description="Knowledge and dataset distillation.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    for mode, text in (("distill", "distill a student from a teacher with a recipe's losses"),
                       ("train", "train a teacher or a no-teacher baseline with the same loop")):
        s = sub.add_parser(mode, help=text, description=text + ".",
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
        s.add_argument("settings", nargs="*", metavar="recipe=NAME|key=value",
                       help="the recipe, then overrides of nested fields, e.g. trainer.epochs=10 losses.kd.T=2")
        s.add_argument("--dry-run", action="store_true", help="print the resolved recipe and exit")
        s.set_defaults(func=lambda ns, m=mode: _run(m, ns))
    s = sub.add_parser("recipes", help="list recipes, models and losses",
                       description="List the named recipes with one-line descriptions, the models and the losses.")
    s.set_defaults(func=_recipes)
    s = sub.add_parser("demo", help="a ~10-minute CPU run: teacher, KD student, no-teacher student",
                       description="Train a small teacher on CIFAR-10, distill a smaller student with KD, train "
                                   "the same student without a teacher, and print the three test accuracies.")
    s.add_argument("--quick", action="store_true", help="a ~1-minute smoke version")
    s.set_defaults(func=_demo)
    s = sub.add_parser("bench", help="benchmarks that write results JSON",
                       description="Benchmarks. `throughput`: KD training images/s (student alone, with a teacher, "
                                   "and the plain PyTorch loop). `classifier`: one leaderboard row, e.g. method=dkd "
                                   "pair=resnet32x4-resnet8x4 seeds=3 [epochs=240 jobs=1 teacher=PATH]. "
                                   "`classifier-table`: regenerate leaderboards/classifier-cifar10.md.")
    s.add_argument("what", help="throughput | classifier | classifier-table")
    s.add_argument("settings", nargs="*", metavar="key=value")
    s.set_defaults(func=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    try:
        return ns.func(ns)
    except KdkitError as e:
        print(f"kdkit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
