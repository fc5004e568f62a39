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
  kdkit distill recipe=smollm2-kd-small           (LM KD on CPU: SmolLM2-135M -> half-depth student, GSM8K)
  kdkit check teacher=smollm2-135m-instruct student=truncated-teacher
  kdkit teacher-signal recipe=smollm2-kd-small out=stores/smollm2-top64 kind=topk k=64
  kdkit bench kernels
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

        if recipe.task == "lm":
            from .llm.build import check_lm_mode

            check_lm_mode(recipe, mode)
        else:
            check_mode(recipe, mode)
        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
        return 0
    if recipe.task == "lm":
        from .llm.build import build_lm_distiller

        distiller = build_lm_distiller(recipe, mode, recipe_name)
    else:
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


def _teacher_signal(ns) -> int:
    from .config import load_recipe
    from .llm.build import write_store_from_recipe

    recipe_name, rest = _split_recipe(ns.settings)
    if recipe_name is None:
        raise KdkitError("`kdkit teacher-signal` needs recipe=NAME (an LM recipe with teacher.model)")
    keys = ("out", "kind", "k", "samples", "temperature", "batch_size")
    store = {a.partition("=")[0]: a.partition("=")[2] for a in rest if a.partition("=")[0] in keys}
    recipe = load_recipe(recipe_name, [a for a in rest if a.partition("=")[0] not in keys])
    print(f"wrote {write_store_from_recipe(recipe, store)}")
    return 0


def _check(ns) -> int:
    from .llm.check import run_check

    return run_check(ns.settings)


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
    elif ns.what == "kernels":
        from .bench.kernels import run_kernels

        print(f"wrote {run_kernels(ns.settings)}")
    elif ns.what == "llm":
        from .bench.llm import run_llm

        run_llm(ns.settings)
    elif ns.what == "classifier-table":
        from .bench.classifier import write_markdown

        if ns.settings:
            raise KdkitError("`kdkit bench classifier-table` takes no settings")
        print(f"wrote {write_markdown()}")
    else:
        raise KdkitError(f"unknown benchmark '{ns.what}'; choices: throughput, classifier, classifier-table, kernels, llm")
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
    s = sub.add_parser("check", help="pre-flight for LM distillation: tokenizers, vocab, dtype, memory",
                       description="Check that a teacher and a student LM can be distilled: vocabulary and tokenizer "
                                   "compatibility, special tokens, dtype/device, and a memory estimate.")
    s.add_argument("settings", nargs="*", metavar="key=value",
                   help="teacher=NAME student=NAME [student.layers=N dtype=bfloat16 seq_len=1024 batch_size=8]")
    s.set_defaults(func=_check)
    s = sub.add_parser("teacher-signal", help="run an LM recipe's teacher once and store its signal on disk",
                       description="Run the recipe's teacher over its training blocks once and store dense, top-k or "
                                   "sampled sparse log-probs (zstd Parquet, tokenizer fingerprint recorded). Train from "
                                   "it with `kdkit distill recipe=... teacher.model=null teacher.cache=DIR`.")
    s.add_argument("settings", nargs="*", metavar="recipe=NAME|key=value",
                   help="recipe=NAME out=DIR [kind=topk|dense|sampled k=64 samples=64 temperature=1 batch_size=8] "
                        "and recipe overrides")
    s.set_defaults(func=_teacher_signal)
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
                                   "`classifier-table`: regenerate leaderboards/classifier-cifar10.md. `kernels`: the fused "
                                   "linear-KD loss against plain PyTorch and Liger-Kernel. `llm`: LM KD against its "
                                   "no-teacher baseline, e.g. recipe=smollm2-kd-small seeds=1.")
    s.add_argument("what", help="throughput | classifier | classifier-table | kernels | llm")
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
