"""Stage 2 of rationale distillation: keep the teacher's correct rationales, set the incorrect ones aside.

Correct = the check of `cot.answer_check` passes (`answer_checks`; by default the rationale's stated final answer
equals the gold answer as a number).
Empty generations and rationales with no parseable answer are dropped and counted (they teach nothing, and a
stage that silently trains on them hides a broken teacher prompt). Duplicates (the same rationale up to case
and whitespace, for the same question) are dropped: sampling at low temperature repeats itself. The incorrect
rationales feed stage 4 (REDI's negatives).
"""
from __future__ import annotations

import re

from .answer_checks import AnswerCheck, answer_check, stated_text
from .answers import extract_answer


def _key(question_id: int, text: str) -> tuple[int, str]:
    return question_id, re.sub(r"\s+", " ", text.strip().lower())


def filter_rationales(rows, check: AnswerCheck | None = None):
    """(correct, incorrect, stats) from stage 1's rows; both datasets gain `predicted` and `correct` columns.
    `check`: an `answer_checks` check (default numeric); only the numeric one finds rationales unparseable."""
    numeric = check is None or check is answer_check("numeric")
    check = check or answer_check("numeric")
    stats = {"generated": len(rows), "empty": 0, "unparseable": 0, "duplicates": 0, "correct": 0, "incorrect": 0}
    seen: set = set()
    keep = {True: [], False: []}
    predicted_all = []
    for i, (qid, text, gold) in enumerate(zip(rows["question_id"], rows["rationale"], rows["gold"])):
        predicted_all.append(None)
        if not text.strip():
            stats["empty"] += 1
            continue
        predicted = extract_answer(text)
        if predicted is None and numeric:
            stats["unparseable"] += 1
            continue
        predicted = predicted if predicted is not None else stated_text(text)
        key = _key(qid, text)
        if key in seen:
            stats["duplicates"] += 1
            continue
        seen.add(key)
        predicted_all[i] = predicted
        ok = bool(check(text, gold))
        stats["correct" if ok else "incorrect"] += 1
        keep[ok].append(i)
    labelled = rows.add_column("predicted", [p or "" for p in predicted_all])
    kept = set(keep[True])
    labelled = labelled.add_column("correct", [i in kept for i in range(len(rows))])
    correct, incorrect = labelled.select(keep[True]), labelled.select(keep[False])
    stats["questions"] = len(set(rows["question_id"]))
    stats["questions_with_correct"] = len(set(correct["question_id"]))
    stats["teacher_sample_accuracy"] = stats["correct"] / max(1, stats["generated"])
    return correct, incorrect, stats
