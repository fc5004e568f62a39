"""The `kdkit` command: each verb maps to one pillar entry point; recipes take `key=value` overrides."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import KdkitError

EPILOG = """examples:
  kdkit recipes
  kdkit train recipe=train-resnet32x4
  kdkit distill recipe=kd-resnet32x4-resnet8x4 teacher.checkpoint=runs/train-resnet32x4-... trainer.epochs=240
  kdkit distill recipe=dkd-resnet32x4-resnet8x4 losses.dkd.beta=8 trainer.mixed_precision=bf16
  kdkit bench classifier method=dkd pair=resnet32x4-resnet8x4 seeds=3
  kdkit distill recipe=cot-math-small            (rationale distillation on CPU: generate, filter, SFT, REDI, eval)
  kdkit distill recipe=smollm2-kd-small           (LM KD on CPU: SmolLM2-135M -> half-depth student, GSM8K)
  kdkit check teacher=smollm2-135m-instruct student=truncated-teacher
  kdkit teacher-signal recipe=smollm2-kd-small out=stores/smollm2-top64 kind=topk k=64
  kdkit serve-teacher smollm2-135m-instruct port=8000   then   kdkit distill ... teacher.server=http://127.0.0.1:8000
  kdkit bench kernels
  kdkit diffusion dmd2                          (one-step DMD2 on a 2-D mixture with an exact teacher: CPU, ~1.3 min)
  kdkit condense cifar10 --ipc 10               (DM at the paper's budget: ~30 h on 2 CPU cores; the run says so)
  kdkit condense cifar10 --ipc 10 preset=cpu    (DM sized for a CPU: ~4 min)
  kdkit diffusion train-teacher data=cifar10 steps=200000   then   kdkit diffusion dmd2 data=cifar10 teacher=RUN
  accelerate launch --num_processes 2 -m kdkit.cli distill recipe=...   (several processes, DDP)
"""


# `kdkit distill|train`: the module that checks and runs each kind of recipe (`task:`)
TASKS = {"classify": "kdkit.train.build", "lm": "kdkit.llm.build", "cot": "kdkit.llm.cot_pipeline"}


def _run(mode: str, ns) -> int:
    import importlib

    from .config import load_recipe, split_recipe

    recipe_name, overrides = split_recipe(ns.settings + ns.after_flag)
    if recipe_name is None:
        raise KdkitError(f"`kdkit {mode}` needs recipe=NAME (see `kdkit recipes`)")
    recipe = load_recipe(recipe_name, overrides)
    task = importlib.import_module(TASKS[recipe.task])
    task.check_recipe(recipe, mode)  # every rule that needs no data or model, before any work
    if ns.dry_run:
        return _print_resolved(recipe)
    run_dir, summary = task.run_recipe(recipe, mode, recipe_name)
    if run_dir is not None:
        print(f"run folder: {run_dir}")
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return 0


def _recipes(ns) -> int:
    """Every pillar's recipes (the verb each runs with), then the models and losses recipes can name."""
    from rich.console import Console
    from rich.table import Table

    from .budget import budget_summary
    from .config import list_recipes, recipe_budget, recipe_description, recipe_pillar
    from .registry import LOSSES, MODELS

    console = Console()
    table = Table(title="kdkit recipes: kdkit VERB recipe=NAME key=value ...")
    table.add_column("recipe", no_wrap=True)  # the name a user types: never cut
    for column in ("verb", "budget -> CPU-sized recipe", "description"):
        table.add_column(column)
    for name in list_recipes():
        pillar = recipe_pillar(name)
        verb = "distill|train" if pillar == "distill" else pillar
        table.add_row(name, f"kdkit {verb}", budget_summary(recipe_budget(name)), recipe_description(name))
    console.print(table)
    console.print(f"[bold]models[/]: {', '.join(MODELS.names())}, timm:<name>")
    console.print(f"[bold]losses[/]: {', '.join(LOSSES.names())}")
    return 0


def _teacher_signal(ns) -> int:
    from .config import load_recipe, split_recipe
    from .llm.build import teacher_signal_options, write_store_from_recipe

    recipe_name, rest = split_recipe(ns.settings)
    if recipe_name is None:
        raise KdkitError("`kdkit teacher-signal` needs recipe=NAME (an LM recipe with teacher.model)")
    options, overrides = teacher_signal_options(rest)
    recipe = load_recipe(recipe_name, overrides)
    print(f"wrote {write_store_from_recipe(recipe, options)}")  # every option checked before the teacher loads
    return 0


def _serve_teacher(ns) -> int:
    from .llm.serve_teacher import run_serve_teacher

    return run_serve_teacher(ns.model, ns.settings)


def _check(ns) -> int:
    from .llm.check import run_check

    return run_check(ns.settings)


class _OptionThenSettings(argparse.Action):
    """`--method mirage epochs=3`: the first value is the option's, the `key=value`s after it are settings
    (argparse alone would reject settings that follow an option once the positionals were read)."""

    def __call__(self, parser, namespace, values, option_string=None):
        first, *rest = values
        if self.dest in ("seeds", "ipc"):
            try:
                first = int(first)
            except ValueError:
                parser.error(f"{option_string}: expected an integer, got {first!r}")
        setattr(namespace, self.dest, first)
        namespace.settings = list(getattr(namespace, "settings", None) or []) + rest


def _dry_run_flag(sub: argparse.ArgumentParser) -> None:
    """`--dry-run` for a verb: every check a run makes before its work, then the resolved settings, no work."""
    sub.add_argument("--dry-run", nargs="*", default=False, action=_FlagThenSettings, metavar="key=value",
                     help="check everything a run checks before its work, print the resolved settings and exit")
    sub.set_defaults(after_flag=[])


def _print_resolved(config) -> int:
    import yaml

    from .config import to_plain

    print(yaml.safe_dump(to_plain(config), sort_keys=False), end="")
    return 0


class _FlagThenSettings(argparse.Action):
    """`--dry-run recipe=x a=1` and `recipe=x --dry-run a=1`: a flag, and the `key=value`s after it are settings
    (kept in `after_flag`: argparse assigns the positional settings after the options)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)
        namespace.after_flag = list(values)


def _condense(ns) -> int:
    from .condense import condense
    from .condense.resolve import default_method

    options = {}
    if ns.gnn is not None:
        options["gnns"] = ns.gnn
    if ns.seeds is not None:
        options["seeds"] = ns.seeds
    if ns.ipc is not None:
        options["ipc"] = ns.ipc
    if ns.eval is not None:
        options["eval"] = ns.eval
    settings = [*ns.settings, *ns.after_flag]
    method = ns.method or default_method(ns.dataset, settings)  # each dataset kind has its own default
    if ns.dry_run:
        from .condense.resolve import load_condense_config

        return _print_resolved(load_condense_config(ns.dataset, method, settings, **options))
    metrics = condense(ns.dataset, method, settings, **options)
    print(f"run folder: {metrics['run_dir']}")
    return 0


def _demo(ns) -> int:
    from .demo import run_demo

    run_demo(quick=ns.quick)
    return 0


# `kdkit bench WHAT`: the module and function that run each benchmark (imported only when asked for)
BENCHMARKS = {"throughput": ("throughput", "run_throughput"), "classifier": ("classifier", "run_classifier"),
              "kernels": ("kernels", "run_kernels"), "llm": ("llm", "run_llm"),
              "generation": ("generation", "run_generation"),
              "condense-graphs": ("condense_graphs", "run_condense_graphs"),
              "condense-images": ("condense_images", "run_condense_images"), "cot": ("cot", "run_cot"),
              "condense-speed": ("condense_speed", "run_condense_speed"),
              "condense-reference": ("condense_reference", "run_condense_reference"),
              "diffusion": ("diffusion", "run_diffusion_bench"),
              "diffusion-images": ("diffusion_images", "run_diffusion_images_bench"),
              "signal-compression": ("signal_compression", "run_signal_compression"),
              "served-teacher": ("served_teacher", "run_served_teacher"),
              "multi-teacher": ("multi_teacher", "run_multi_teacher"),
              "llm-losses": ("llm_losses", "run_llm_losses")}


def _bench(ns) -> int:
    import importlib

    if ns.what == "classifier-table":
        from .bench.classifier import write_markdown

        if ns.settings:
            raise KdkitError("`kdkit bench classifier-table` takes no settings")
        print(f"wrote {write_markdown()}")
        return 0
    if ns.what not in BENCHMARKS:
        raise KdkitError(f"unknown benchmark '{ns.what}'; choices: {', '.join([*BENCHMARKS, 'classifier-table'])}")
    module, function = BENCHMARKS[ns.what]
    result = getattr(importlib.import_module(f"kdkit.bench.{module}"), function)(ns.settings)
    if isinstance(result, (str, Path)):  # the benchmarks that return the table they wrote
        print(f"wrote {result}")
    return 0


def _diffusion(ns) -> int:
    """`kdkit diffusion METHOD|train-teacher [recipe=NAME] [key=value ...]` (few-step diffusion distillation)."""
    from .diffusion.run import run_diffusion

    out = run_diffusion(ns.what, [*ns.settings, *ns.after_flag], dry_run=ns.dry_run)
    if ns.dry_run:
        return _print_resolved(out)
    print(f"run folder: {out['run_dir']}")
    reports = (("teacher", out.get("eval")),) if ns.what == "train-teacher" else (
        ("teacher", out.get("teacher")), ("student", out.get("final")))
    for label, rep in reports:
        if rep:
            print(f"{label}: " + "  ".join(f"{k}={v:.4g}" for k, v in rep.items() if isinstance(v, float)))
    return 0


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kdkit", description="Knowledge and dataset distillation.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=_Parser)
    for mode, text in (("distill", "distill a student from a teacher with a recipe's losses"),
                       ("train", "train a teacher or a no-teacher baseline with the same loop")):
        s = sub.add_parser(mode, help=text, description=text + ".",
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
        s.add_argument("settings", nargs="*", metavar="recipe=NAME|key=value",
                       help="the recipe, then overrides of nested fields, e.g. trainer.epochs=10 losses.kd.T=2")
        _dry_run_flag(s)
        s.set_defaults(func=lambda ns, m=mode: _run(m, ns))
    s = sub.add_parser("check", help="pre-flight for LM distillation: tokenizers, vocab, dtype, memory",
                       description="Check that a teacher and a student LM can be distilled: vocabulary and tokenizer "
                                   "compatibility, special tokens, dtype/device, and a memory estimate.")
    s.add_argument("settings", nargs="*", metavar="key=value",
                   help="teacher=NAME student=NAME [student.layers=N dtype=float32|bfloat16|float16 seq_len=1024 "
                        "batch_size=8 device=auto|cpu|cuda chunk_size=1024 lora=true lora.r=16]")
    s.set_defaults(func=_check)
    s = sub.add_parser("teacher-signal", help="run an LM recipe's teacher once and store its signal on disk",
                       description="Run the recipe's teacher over its training blocks once and store dense, top-k or "
                                   "sampled sparse log-probs (zstd Parquet, tokenizer fingerprint recorded). Train from "
                                   "it with `kdkit distill recipe=... teacher.model=null teacher.cache=DIR`.")
    s.add_argument("settings", nargs="*", metavar="recipe=NAME|key=value",
                   help="recipe=NAME out=DIR [kind=topk|dense|sampled k=64 samples=64 temperature=1 batch_size=8] "
                        "and recipe overrides")
    s.set_defaults(func=_teacher_signal)
    s = sub.add_parser("serve-teacher", help="serve an LM teacher with vLLM for teacher.server=URL",
                       description="Start vLLM's OpenAI-compatible server for MODEL with the flags kdkit's served "
                                   "teacher needs (max-logprobs, no prefix caching, raw log-probs, no generation "
                                   "defaults); train with `kdkit distill ... teacher.server=http://HOST:PORT`.")
    s.add_argument("model", metavar="MODEL", help="a kdkit model name, hf:<id> or a model folder")
    s.add_argument("settings", nargs="*", metavar="key=value",
                   help="host=127.0.0.1 port=8000 max_logprobs=64 max_model_len=N dtype=auto python=PATH")
    s.set_defaults(func=_serve_teacher)
    s = sub.add_parser("condense", help="dataset distillation: condense a dataset, train on it, compare with baselines",
                       description="Condense a dataset with a method, train models on the condensed set, a random "
                                   "subset of the same storage size (or random real images) and the full set, and "
                                   "write a run folder. Each run logs early what it will cost here, and the "
                                   "CPU-sized recipe to run instead. The paper settings per method and IPC are recipes "
                                   "(`kdkit recipes`: condense-*), picked from the dataset, --method, --ipc and "
                                   "preset=NAME, or named with recipe=NAME; key=value overrides any setting, e.g. "
                                   "iterations=200 experts=10 tesla=true eval_epochs=300 (images), depth=2 "
                                   "min_support=0.1 epochs=100 pool=sum (graphs); resume=auto|false, name=NAME.")
    s.add_argument("dataset", help="cifar10 | mutag | ptc_mr | proteins | nci1 | nci109")
    s.add_argument("--method", default=None, nargs="+", action=_OptionThenSettings, metavar="METHOD",
                   help="condensation method (images: dm by default, mtt, datm, cvdd, ...; graphs: mirage)")
    s.add_argument("--ipc", default=None, nargs="+", action=_OptionThenSettings, metavar="K",
                   help="images: synthetic images per class (the papers publish 1, 10, 50)")
    s.add_argument("--eval", default=None, nargs="+", action=_OptionThenSettings, metavar="PROTOCOL",
                   help="images: evaluation protocol, convnet (default; cvdd: resnet18) | resnet18")
    s.add_argument("--gnn", default=None, nargs="+", action=_OptionThenSettings, metavar="GNN",
                   help="gcn | gin | gat | sage, or a comma list (default gcn)")
    s.add_argument("--seeds", default=None, nargs="+", action=_OptionThenSettings, metavar="N",
                   help="splits/seeds to run (default 5)")
    s.add_argument("settings", nargs="*", metavar="recipe=NAME|preset=NAME|key=value")
    _dry_run_flag(s)
    s.set_defaults(func=_condense)
    s = sub.add_parser("recipes", help="list recipes, models and losses",
                       description="List the named recipes with one-line descriptions, the models and the losses.")
    s.set_defaults(func=_recipes)
    s = sub.add_parser("demo", help="a ~3.5-minute CPU run: teacher, KD student, no-teacher student",
                       description="Train a small teacher on CIFAR-10, distill a smaller student with KD, train "
                                   "the same student without a teacher, and print the three test accuracies.")
    s.add_argument("--quick", action="store_true", help="a ~1-minute smoke version")
    s.set_defaults(func=_demo)
    s = sub.add_parser("diffusion", help="few-step diffusion distillation: dmd2, sid, cd, rectflow, train-teacher",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Distill a many-step diffusion teacher into a one- or few-step generator. Methods: "
                                   "dmd2, sid, cd (consistency distillation), rectflow (paired regression). The "
                                   "default is a 2-D Gaussian mixture with its exact teacher on CPU (the recipe "
                                   "diffusion-METHOD-mixture: 0.5-1.3 min on one thread, a one-step student within "
                                   "1.05x the teacher's sliced-W2). Settings: recipe=NAME "
                                   "data=mixture|cifar10 teacher=analytic|RUN|diffusers:FOLDER steps=N batch_size=N "
                                   "generator_steps=K fast=eager|compile|cuda_graph resume=auto name=NAME, and the "
                                   "method's options, bare or as options.KEY (e.g. fake_steps=5 guidance_scale=2 "
                                   "gan=true lr_generator=1e-5).",
                       epilog="examples:\n  kdkit diffusion dmd2\n  kdkit diffusion sid steps=3000\n"
                              "  kdkit diffusion train-teacher data=cifar10 steps=200000 batch_size=128\n"
                              "  kdkit diffusion dmd2 data=cifar10 teacher=runs/diffusion-teacher-cifar10-... "
                              "guidance_scale=2 fd_classifier=runs/train-resnet56-...")
    s.add_argument("what", help="dmd2 | sid | cd | rectflow | train-teacher")
    s.add_argument("settings", nargs="*", metavar="recipe=NAME|key=value")
    _dry_run_flag(s)
    s.set_defaults(func=_diffusion)
    s = sub.add_parser("bench", help="benchmarks that write results JSON",
                       description="Benchmarks. `throughput`: KD training images/s (student alone, with a teacher, "
                                   "and the plain PyTorch loop). `classifier`: one leaderboard row, e.g. method=dkd "
                                   "pair=resnet32x4-resnet8x4 seeds=3 [epochs=240 jobs=1 teacher=PATH]. "
                                   "`classifier-table`: regenerate leaderboards/classifier-cifar10.md. `kernels`: the fused "
                                   "linear-KD loss against plain PyTorch and Liger-Kernel. `llm`: LM KD against its "
                                   "no-teacher baseline, e.g. recipe=smollm2-kd-small seeds=1. `generation`: teacher-generation "
                                   "tokens/s, vLLM (.venv-vllm) against transformers, e.g. prompts=64 n=4 max_new_tokens=128. "
                                   "`condense-graphs`: Mirage graph condensation against a random subset of the same "
                                   "size and the full data, e.g. datasets=nci1,mutag gnns=gcn,gin seeds=5; writes "
                                   "leaderboards/condense-graphs.md.")
    s.add_argument("what", help="throughput | classifier | classifier-table | kernels | llm | generation | condense-graphs | condense-images | condense-speed | condense-reference | cot")
    s.add_argument("settings", nargs="*", metavar="key=value")
    s.set_defaults(func=_bench)
    return p


class _Parser(argparse.ArgumentParser):
    """argparse with kdkit's one-line errors (no usage block): `kdkit: error: ...`, exit code 2."""

    def error(self, message: str):
        raise KdkitError(f"{message} (see `{self.prog} --help`)")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    from .run import Interrupted

    try:
        ns = parser().parse_args(argv)
        return ns.func(ns)
    except Interrupted as e:
        print(f"kdkit: {_one_line(e)}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("kdkit: interrupted (Ctrl-C) before the run had a step to save", file=sys.stderr)
        return 130
    except KdkitError as e:
        print(f"kdkit: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
