"""`kdkit bench cot`: the student's GSM8K accuracy after answer-only SFT vs rationale SFT vs rationale SFT + REDI.

All variants answer the same test questions and train on the same training questions; the teacher's rationales
are generated once (the first seed's run) and reused by every other run (`cot.generations`). Per seed: one
`answer_only` run and one `rationale` run with REDI, which reports the accuracy after SFT and after REDI.
Result files go to leaderboards/results/cot/, the table to leaderboards/cot-gsm8k.md. A row's `wall_seconds` is
this invocation only (a finished run reloads in seconds); `stage_seconds` is what each stage cost over every
(re)run of the run folder.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..config import PositiveInt
from ..errors import ConfigError
from .results import RESULTS_DIR, bench_options, run_kdkit, run_record

KIND = "cot"
MARKDOWN = RESULTS_DIR.parent / "cot-gsm8k.md"
VARIANTS = {"answer_only": ["cot.sft=answer_only", "cot.redi=false"], "rationale_redi": ["cot.sft=rationale",
                                                                                         "cot.redi=true"]}


@dataclass
class CoTBench:
    """`kdkit bench cot` options; any other `key=value` is an override of the recipe, checked before any run."""

    recipe: str = "cot-math-small"
    seeds: PositiveInt = 1
    runs: str = "runs/bench-cot"  # the run folders' output_dir
    out: str | None = None  # result files here instead of leaderboards/results/cot (and no table)


def _check_runs(opts: CoTBench, overrides: list[str]) -> None:
    """Every run this bench will start, validated as `kdkit distill` would validate it, before the first one."""
    from ..config import load_recipe
    from ..llm.cot_pipeline import check_recipe

    for seed in range(opts.seeds):
        for variant, extra in VARIANTS.items():
            recipe = load_recipe(opts.recipe, [*overrides, *extra, f"trainer.seed={seed}", f"output_dir={opts.runs}",
                                               f"name={opts.recipe}__{variant}__s{seed}"])
            if recipe.task != "cot":
                raise ConfigError(f"recipe={opts.recipe} is a task: {recipe.task} recipe; `kdkit bench cot` runs "
                                  "task: cot recipes (e.g. cot-math-small, cot-math-cpu)")
            check_recipe(recipe, "distill")


def run_cot(settings: list[str]) -> list[dict]:
    opts, overrides = bench_options(CoTBench, settings, passthrough=True)
    _check_runs(opts, overrides)
    out = Path(opts.out or RESULTS_DIR / KIND)
    out.mkdir(parents=True, exist_ok=True)
    command = "kdkit bench cot " + " ".join(settings)
    rows, generations = [], None
    for seed in range(opts.seeds):
        for variant, extra in VARIANTS.items():
            name = f"{opts.recipe}__{variant}__s{seed}"
            reuse = [f"cot.generations={generations}"] if generations else []
            # the teacher and the untrained student answer the same questions in every run: evaluate each once
            skip_evals = [] if seed == 0 and variant == "rationale_redi" else ["cot.eval_teacher=false"]
            if seed > 0 or variant != "answer_only":
                skip_evals.append("cot.eval_student_before=false")
            cmd, wall = run_kdkit(["distill", f"recipe={opts.recipe}", *overrides, *extra, *reuse, *skip_evals,
                                   f"trainer.seed={seed}", f"output_dir={opts.runs}", f"name={name}",
                                   "trainer.progress=false"])
            run = Path(opts.runs) / name
            report = json.loads((run / "report.json").read_text())
            if generations is None and (run / "generate" / "rationales").exists():
                generations = str(run)
            row = run_record(KIND, command, cmd, wall, recipe=opts.recipe, variant=variant, seed=seed,
                             overrides=overrides, accuracy=report["accuracy"], filter=report.get("filter"),
                             stage_seconds=report.get("stage_seconds"))
            (out / f"{name}.json").write_text(json.dumps(row, indent=1))
            rows.append(row)
            print(f"{name}: " + ", ".join(f"{k} {100 * v['accuracy']:.1f}%" for k, v in report["accuracy"].items()))
    if opts.out is None:
        print(f"wrote {write_cot_markdown()}")
    return rows


def _fmt(xs: list[float]) -> str:
    if not xs:
        return "—"
    if len(xs) == 1:
        return f"{100 * xs[0]:.1f}%"
    return f"{100 * statistics.mean(xs):.1f} ± {100 * statistics.stdev(xs):.1f}%"


def _student(recipe: str, overrides: list[str]) -> str:
    """The student the rows trained, as the recipe resolves it (a truncated copy names its depth)."""
    from ..config import load_recipe

    s = load_recipe(recipe, overrides).student
    layers = (s.options or {}).get("layers")
    return f"{s.model} ({layers} layers)" if layers else s.model


def write_cot_markdown(directory: Path | None = None, path: Path | None = None) -> Path:
    """The table from the result files: one row per recipe + overrides, columns per model state, mean ± std."""
    directory = Path(directory or RESULTS_DIR / KIND)
    path = Path(path or MARKDOWN)
    groups: dict[tuple, list[dict]] = {}
    for f in sorted(directory.glob("*.json")):
        row = json.loads(f.read_text())
        groups.setdefault((row["recipe"], " ".join(row["overrides"])), []).append(row)
    lines = ["# Rationale distillation on GSM8K (test accuracy, greedy, exact numeric match)", "",
             "Generated by `kdkit bench cot` from `leaderboards/results/cot/*.json`; every column answers the same test "
             "questions. Answer-only SFT trains on the gold answers of the same training questions; rationale SFT on "
             "the teacher's correct rationales (plus the dataset's own where the recipe mixes them in, cot.short_ratio)."
             " Papers' figures use far larger teachers (e.g. 540B PaLM in Distilling Step-by-Step) and are not "
             "comparable with these tiny CPU runs.", "",
             "| recipe | overrides | student | seeds | teacher | student before | answer-only SFT | rationale SFT | "
             "rationale SFT + REDI | teacher rationales kept | hardware | command |", "|" + "---|" * 12]
    for (recipe, ov), rows in groups.items():
        def acc(variant, key):
            return [r["accuracy"][key]["accuracy"] for r in rows if r["variant"] == variant and key in r["accuracy"]]

        f = next((r["filter"] for r in rows if r.get("filter")), None)
        kept = f"{f['correct']}/{f['generated']}" if f else "—"
        per = {v: len({r["seed"] for r in rows if r["variant"] == v}) for v in VARIANTS}
        # a comparison still under way says how many seeds each column has
        seeds = str(per["answer_only"]) if len(set(per.values())) == 1 else \
            f"{per['answer_only']} answer-only, {per['rationale_redi']} rationale"
        hw = rows[0]["hardware"]
        lines.append(f"| {recipe} | `{ov}` | {_student(recipe, rows[0]['overrides'])} | {seeds} | {_fmt(acc('rationale_redi', 'teacher'))} | "
                     f"{_fmt(acc('answer_only', 'student_before') + acc('rationale_redi', 'student_before'))} | "
                     f"{_fmt(acc('answer_only', 'student_sft_answer_only'))} | "
                     f"{_fmt(acc('rationale_redi', 'student_sft_rationale'))} | "
                     f"{_fmt(acc('rationale_redi', 'student_sft_redi'))} | {kept} | {hw['device']} "
                     f"({hw['threads']} threads) | `{rows[0]['command']}` |")
    path.write_text("\n".join(lines) + "\n")
    return path
