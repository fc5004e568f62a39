"""Stage 5 of rationale distillation: GSM8K test accuracy, greedy decoding, exact numeric match.

Every model in the report (teacher, student before, after SFT, after REDI) answers the same test questions
with the same decoding, and its predictions are kept as a `datasets` dataset beside the report.
"""
from __future__ import annotations

import logging
from pathlib import Path

from .answer_checks import AnswerCheck, answer_check, stated_text
from .answers import extract_answer
from .generation import Completion, EmptyGenerationError, SamplingSpec

log = logging.getLogger(__name__)


def evaluate_accuracy(backend, prompts: list[str], golds: list[str], max_new_tokens: int, out_dir=None,
                      check: AnswerCheck | None = None) -> dict:
    """Greedy answers to `prompts` -> accuracy (by `check`, default numeric) and per-question rows (saved to OUT
    when given)."""
    check = check or answer_check("numeric")
    import datasets

    try:
        outs = backend.generate(prompts, SamplingSpec(n=1, temperature=0.0, max_new_tokens=max_new_tokens))
    except EmptyGenerationError as e:  # a measurement, not a set-up error here: the model answers nothing
        log.warning("every answer is empty (%s); scored as wrong", e)
        outs = [[Completion("", 0, "stop")] for _ in prompts]
    texts = [o[0].text for o in outs]
    numbers = [extract_answer(t) for t in texts]
    predicted = [n if n is not None else stated_text(t) or None for n, t in zip(numbers, texts)]
    correct = [bool(check(t, g)) for t, g in zip(texts, golds)]
    rows = datasets.Dataset.from_dict({"prompt": prompts, "gold": golds, "output": texts,
                                       "predicted": [p or "" for p in predicted], "correct": correct,
                                       "num_tokens": [o[0].num_tokens for o in outs]})
    if out_dir is not None:
        from .cot_generate import save_dataset

        save_dataset(rows, out_dir)
    n = max(1, len(golds))
    return {"accuracy": sum(correct) / n, "correct": sum(correct), "questions": len(golds),
            "unparseable": sum(x is None for x in numbers) / n,
            "mean_new_tokens": sum(o[0].num_tokens for o in outs) / n, "rows": rows}


def write_report(run_dir: Path, report: dict, examples: dict[str, list[dict]]) -> None:
    """report.json (numbers) and report.md (a table plus examples of the student's rationales)."""
    import json

    (run_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    lines = ["# Rationale distillation report", "", f"Teacher: `{report['teacher']}`; student: `{report['student']}`; "
             f"SFT mode: `{report['sft']}`; {report['test_questions']} GSM8K test questions, greedy, exact numeric "
             "match.", "", "| model | accuracy | unparseable | mean new tokens |", "|---|---|---|---|"]
    for name, m in report["accuracy"].items():
        lines.append(f"| {name} | {100 * m['accuracy']:.2f}% ({m['correct']}/{m['questions']}) | "
                     f"{100 * m['unparseable']:.1f}% | {m['mean_new_tokens']:.0f} |")
    if "filter" in report:
        f = report["filter"]
        lines += ["", "Teacher rationales: " + ", ".join(f"{k} {v if isinstance(v, int) else f'{v:.3f}'}"
                                                        for k, v in f.items())]
    if report.get("stage_seconds"):
        lines += ["", "Wall seconds per stage, summed over every (re)run of this folder: " + ", ".join(
            f"{k} {v:.0f}" for k, v in report["stage_seconds"].items())]
    for name, rows in examples.items():
        lines += ["", f"## Examples: {name}"]
        for r in rows:
            mark = "correct" if r["correct"] else f"wrong (gold {r['gold']})"
            lines += ["", f"**{mark}**", "", "```", r["output"].strip()[:1500], "```"]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
