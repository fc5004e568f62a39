"""`kdkit bench cot`: what a student gains from a teacher's rationales, at the same questions and student budget.

Variants (`variants=`), each a `kdkit distill` run per seed:
- ``answer_only``: SFT on the gold answers alone (no rationale, no teacher): the baseline;
- ``rationale_redi``: SFT on the teacher's correct rationales, then REDI on its incorrect ones (paired with a
  correct trace of the same question, or with the dataset's rationale where the teacher has none); the run reports
  the accuracy after SFT (the rationale-SFT column) and after REDI;
- ``rationale_kd``: rationale SFT plus token-level KD from the teacher on the same completion tokens.

With `teacher_recipe=` (default cot-chainsum-teacher; `none` keeps the recipe's own teacher.model), the teacher is
first fine-tuned by that `kdkit train` recipe (skipped when its run folder
is finished); its RUN/sft/model is every run's teacher.model, and its checkpoint hash, accuracy and training time
go into every row. The teacher's rationales are generated once (the first run that needs them) and reused by
every other run (`cot.generations`). Result files go to leaderboards/results/cot/, the tables to
leaderboards/cot-<data>.md (GSM8K: cot-gsm8k.md). A row's `wall_seconds` is this invocation only (a finished run
reloads in seconds); `stage_seconds` is what each stage cost over every (re)run of the run folder.
"""
from __future__ import annotations

import hashlib
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..config import PositiveInt, load_recipe
from ..errors import ConfigError
from .results import RESULTS_DIR, bench_options, mean_std, name_list, run_kdkit, run_record

KIND = "cot"
VARIANTS = {"answer_only": ["cot.sft=answer_only", "cot.redi=false"],
            # a question whose every sampled trace is wrong pairs its incorrect trace with the dataset's rationale
            "rationale_redi": ["cot.sft=rationale", "cot.redi=true", "cot.redi_reference_positives=true"],
            "rationale_kd": ["cot.sft=rationale", "cot.redi=false", "cot.kd_weight=1.0"]}
# (column, variant whose runs report it, accuracy key)
COLUMNS = (("student before", None, "student_before"), ("answer-only SFT", "answer_only", "student_sft_answer_only"),
           ("rationale SFT", "rationale_redi", "student_sft_rationale"),
           ("rationale SFT + REDI", "rationale_redi", "student_sft_redi"),
           ("rationale SFT + token KD", "rationale_kd", "student_sft_rationale"))
SPLIT_NAMES = {"test": "held-out questions", "hard": "longer chains than training (5-6 terms)"}


@dataclass
class CoTBench:
    """`kdkit bench cot` options; any other `key=value` is an override of the recipe, checked before any run."""

    recipe: str = "cot-chainsum"
    seeds: PositiveInt = 3
    variants: str = "answer_only,rationale_redi,rationale_kd"  # comma list of VARIANTS
    # a `kdkit train` recipe run first, its RUN/sft/model the teacher ("none": the recipe's own teacher.model)
    teacher_recipe: str = "cot-chainsum-teacher"
    runs: str = "runs/bench-cot"  # the run folders' output_dir
    out: str | None = None  # result files here instead of leaderboards/results/cot (and no table)

    def names(self) -> list[str]:
        return name_list(self.variants, "variants", VARIANTS)


def _teacher_recipe(opts: CoTBench) -> str | None:
    return None if opts.teacher_recipe.lower() in ("none", "") else opts.teacher_recipe


def _teacher_folder(opts: CoTBench) -> Path:
    return Path(opts.runs) / opts.teacher_recipe / "sft" / "model"


def _check_runs(opts: CoTBench, overrides: list[str]) -> None:
    """Every run this bench will start, validated as `kdkit distill` (and `kdkit train`) would, before the first."""
    from ..llm.cot_pipeline import check_recipe

    if _teacher_recipe(opts):
        teacher = load_recipe(opts.teacher_recipe, [f"output_dir={opts.runs}", f"name={opts.teacher_recipe}"])
        if teacher.task != "cot":
            raise ConfigError(f"teacher_recipe={opts.teacher_recipe} is a task: {teacher.task} recipe; it must be a "
                              "task: cot recipe run by `kdkit train` (cot.sft=reference)")
        check_recipe(teacher, "train")
        # the teacher does not exist yet: check the runs with a stand-in of the same tokenizer
        overrides = [*overrides, f"teacher.model={teacher.student.model}"]
    for seed in range(opts.seeds):
        for variant in opts.names():
            recipe = load_recipe(opts.recipe, [*overrides, *VARIANTS[variant], f"trainer.seed={seed}",
                                               f"output_dir={opts.runs}", f"name={opts.recipe}__{variant}__s{seed}"])
            if recipe.task != "cot":
                raise ConfigError(f"recipe={opts.recipe} is a task: {recipe.task} recipe; `kdkit bench cot` runs "
                                  "task: cot recipes (e.g. cot-chainsum, cot-math-small)")
            check_recipe(recipe, "distill")


def _train_teacher(opts: CoTBench) -> dict:
    """Run (or reload) the teacher recipe; its checkpoint's hash, accuracies and wall seconds."""
    name = opts.teacher_recipe
    cmd, wall = run_kdkit(["train", f"recipe={name}", f"output_dir={opts.runs}", f"name={name}",
                           "trainer.progress=false"])
    run = Path(opts.runs) / name
    report = json.loads((run / "report.json").read_text())
    weights = _teacher_folder(opts) / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    accuracy = {k.replace("student_sft_reference", "teacher"): v["accuracy"] for k, v in report["accuracy"].items()
                if k.startswith("student_sft_reference")}
    return {"recipe": name, "command": "kdkit " + " ".join(cmd[3:]), "checkpoint": str(_teacher_folder(opts)),
            "sha256": digest, "accuracy": accuracy, "stage_seconds": report.get("stage_seconds"),
            "wall_seconds": wall}


def run_cot(settings: list[str]) -> list[dict]:
    opts, overrides = bench_options(CoTBench, settings, passthrough=True)
    _check_runs(opts, overrides)
    out = Path(opts.out or RESULTS_DIR / KIND)
    out.mkdir(parents=True, exist_ok=True)
    command = "kdkit bench cot " + " ".join(settings)
    teacher = _train_teacher(opts) if _teacher_recipe(opts) else None
    user_overrides = list(overrides)  # a row's group: the teacher's folder is in teacher_run, not here
    if teacher:
        print(f"teacher {teacher['checkpoint']} (sha256 {teacher['sha256'][:16]}): "
              + ", ".join(f"{k} {100 * v:.1f}%" for k, v in teacher["accuracy"].items()))
        overrides = [*overrides, f"teacher.model={teacher['checkpoint']}"]
    # a scratch student is randomly initialised: it writes until max_new_tokens on every question (10 minutes of
    # evaluation on this CPU) to score 0; the table says "random init" instead
    scratch = load_recipe(opts.recipe, overrides).student.model == "scratch"
    rows, generations, first = [], None, not scratch
    for seed in range(opts.seeds):
        for variant in opts.names():
            name = f"{opts.recipe}__{variant}__s{seed}"
            reuse = [f"cot.generations={generations}"] if generations and variant != "answer_only" else []
            # the teacher and the untrained student answer the same questions in every run: evaluate each once
            # (a trained teacher was evaluated by its own run, on the same questions and prompt)
            wants_teacher = teacher is None and seed == 0 and variant == "rationale_redi"
            skip_evals = [] if wants_teacher else ["cot.eval_teacher=false"]
            if not first:
                skip_evals.append("cot.eval_student_before=false")
            first = False
            cmd, wall = run_kdkit(["distill", f"recipe={opts.recipe}", *overrides, *VARIANTS[variant], *reuse,
                                   *skip_evals, f"trainer.seed={seed}", f"output_dir={opts.runs}", f"name={name}",
                                   "trainer.progress=false"])
            run = Path(opts.runs) / name
            report = json.loads((run / "report.json").read_text())
            if generations is None and (run / "generate" / "rationales").exists():
                generations = str(run)
            accuracy = dict(report["accuracy"])
            if teacher:
                accuracy.update({k: {"accuracy": v} for k, v in teacher["accuracy"].items()})
            row = run_record(KIND, command, cmd, wall, recipe=opts.recipe, data=report.get("data", "gsm8k"),
                             variant=variant, seed=seed, overrides=user_overrides, accuracy=accuracy, filter=report.get("filter"),
                             eval_questions=report.get("eval_questions"), student=_student(opts.recipe, overrides),
                             teacher_run=teacher, stage_seconds=report.get("stage_seconds"))
            (out / f"{name}.json").write_text(json.dumps(row, indent=1))
            rows.append(row)
            print(f"{name}: " + ", ".join(f"{k} {100 * v['accuracy']:.1f}%" for k, v in accuracy.items()))
    if opts.out is None:
        for data in sorted({r["data"] for r in rows}):
            print(f"wrote {write_cot_markdown(data=data)}")
    return rows


def _fmt(xs: list[float]) -> str:
    return mean_std(xs, ".1f", scale=100, suffix="%")


def _student(recipe: str, overrides: list[str]) -> str:
    """The student the rows trained, as the recipe resolves it (a truncated copy names its depth, a scratch model
    its size)."""

    s = load_recipe(recipe, overrides).student
    opts = s.options or {}
    if opts.get("layers"):
        return f"{s.model} ({opts['layers']} layers)"
    if s.model == "scratch" and opts:
        shape = [f"{opts['num_hidden_layers']} layers" if "num_hidden_layers" in opts else "",
                 f"width {opts['hidden_size']}" if "hidden_size" in opts else ""]
        return "scratch (" + ", ".join(x for x in shape if x) + ", the teacher's tokenizer)"
    return s.model


def markdown_path(data: str) -> Path:
    return RESULTS_DIR.parent / f"cot-{data.replace('_', '-')}.md"


def write_cot_markdown(directory: Path | None = None, path: Path | None = None, data: str = "gsm8k") -> Path:
    """The tables of one task (`data`) from the result files: one row per recipe + overrides and split, a column
    per model state (mean ± std over seeds), the rationale-vs-answer-only gap against the seed spread, and the wall
    seconds of each stage."""
    directory = Path(directory or RESULTS_DIR / KIND)
    path = Path(path or markdown_path(data))
    groups: dict[tuple, list[dict]] = {}
    for f in sorted(directory.glob("*.json")):
        row = json.loads(f.read_text())
        if row.get("data", "gsm8k") == data:
            groups.setdefault((row["recipe"], " ".join(row["overrides"])), []).append(row)
    title = {"gsm8k": "GSM8K", "chain_sum": "chain sums (reasoning-gym)"}.get(data, data)
    lines = [f"# Rationale distillation on {title} (greedy accuracy, exact numeric match)", "",
             "Generated by `kdkit bench cot` from `leaderboards/results/cot/*.json`; every column answers the same "
             "questions, and every student trains on the same training questions with the same budget. Answer-only "
             "SFT trains on the gold answers; rationale SFT on the teacher's correct rationales (plus the dataset's own"
             " where the recipe mixes them in, cot.short_ratio); REDI then learns from the teacher's incorrect ones; "
             "token KD adds the teacher's token distributions on the same completion tokens. The gap column is "
             "rationale SFT minus answer-only SFT (mean over seeds) against the larger of their two seed standard "
             "deviations. Papers' figures use far larger teachers (e.g. 540B PaLM in Distilling Step-by-Step) and are "
             "not comparable with these CPU runs.", ""]
    head = ("| recipe | overrides | split | student | seeds | teacher | " + " | ".join(c for c, _, _ in COLUMNS)
            + " | gap rationale − answer-only (spread) | teacher rationales kept | hardware | command |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    seconds: dict[tuple, dict[str, list[float]]] = {}
    teachers = {}
    for (recipe, ov), rows in groups.items():
        splits = [s for s in ("test", "hard") if any(f"student_sft_answer_only{_suffix(s)}" in r["accuracy"]
                                                    or f"student_sft_rationale{_suffix(s)}" in r["accuracy"]
                                                    for r in rows)]
        for split in splits:
            def acc(variant, key):
                key = key + _suffix(split)
                return [r["accuracy"][key]["accuracy"] for r in rows
                        if (variant is None or r["variant"] == variant) and key in r["accuracy"]]

            f = next((r["filter"] for r in rows if r.get("filter")), None)
            kept = f"{f['correct']}/{f['generated']}" if f else "—"
            per = {v: len({r["seed"] for r in rows if r["variant"] == v}) for v in VARIANTS}
            per = {v: n for v, n in per.items() if n}
            seeds = str(next(iter(per.values()))) if len(set(per.values())) == 1 else \
                ", ".join(f"{n} {v}" for v, n in per.items())
            teacher = acc(None, "teacher")[:1]
            ans, rat = acc("answer_only", "student_sft_answer_only"), acc("rationale_redi", "student_sft_rationale")
            gap = "—"
            if len(ans) > 1 and len(rat) > 1:
                spread = max(statistics.stdev(ans), statistics.stdev(rat))
                gap = f"{100 * (statistics.mean(rat) - statistics.mean(ans)):+.1f} ({100 * spread:.1f})"
            cells = [_fmt(acc(v, k)) for _, v, k in COLUMNS]
            student = _student(recipe, rows[0]['overrides'])
            if cells[0] == "—" and student.startswith("scratch"):
                cells[0] = "random init"
            n = (rows[0].get("eval_questions") or {}).get(split)
            where = SPLIT_NAMES.get(split, split) + (f", {n}" if n else "")
            hw = rows[0]["hardware"]
            lines.append(f"| {recipe} | `{ov}` | {split} ({where}) | {student} | "
                         f"{seeds} | {_fmt(teacher)} | " + " | ".join(cells) + f" | {gap} | {kept} | "
                         f"{hw['device']} ({hw['threads']} threads) | `{rows[0]['command']}` |")
        for r in rows:
            for stage, s in (r.get("stage_seconds") or {}).items():
                seconds.setdefault((recipe, ov, r["variant"]), {}).setdefault(stage, []).append(s)
            if r.get("teacher_run"):
                teachers[(recipe, ov)] = r["teacher_run"]
    if teachers:
        lines += ["", "## Teachers", "", "| recipe | teacher recipe | checkpoint sha256 | accuracy | training wall s | "
                  "command |", "|---|---|---|---|---|---|"]
        for (recipe, _), t in teachers.items():
            accs = ", ".join(f"{'test' if k == 'teacher' else k.split('@')[1]} {100 * v:.1f}%"
                             for k, v in t["accuracy"].items())
            train_s = sum((t.get("stage_seconds") or {}).values())
            lines.append(f"| {recipe} | {t['recipe']} | `{t['sha256'][:16]}` | {accs} | {train_s:.0f} | "
                         f"`{t['command']}` |")
    if groups:
        lines += ["", "## Whole bench", "", "| recipe | overrides | seeds | teacher training + evaluation min | "
                  "student runs min | total min |", "|---|---|---|---|---|---|"]
        for (recipe, ov), rows in groups.items():
            t = teachers.get((recipe, ov))
            teacher_s = sum((t.get("stage_seconds") or {}).values()) if t else 0.0
            runs_s = sum(r.get("wall_seconds", 0.0) for r in rows)
            lines.append(f"| {recipe} | `{ov}` | {len({r['seed'] for r in rows})} | {teacher_s / 60:.0f} | "
                         f"{runs_s / 60:.0f} | {(teacher_s + runs_s) / 60:.0f} |")
    if seconds:
        lines += ["", "## Wall seconds per stage (mean over seeds)", "", "| recipe | overrides | variant | stages |",
                  "|---|---|---|---|"]
        for (recipe, ov, variant), stages in seconds.items():
            cells = ", ".join(f"{k} {statistics.mean(v):.0f}" for k, v in stages.items())
            lines.append(f"| {recipe} | `{ov}` | {variant} | {cells} |")
    path.write_text("\n".join(lines) + "\n")
    return path


def _suffix(split: str) -> str:
    return "" if split == "test" else f"@{split}"
