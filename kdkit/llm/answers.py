"""Final answers of math rationales: parse them the ways models write them, and compare them as numbers.

Why numbers: GSM8K answers are integers, and "1,200", "$1200.00" and "1200" are the same answer; string
equality would mark correct rationales wrong. The parsers, in the order tried (the last match of the first
kind that matches wins, since models restate intermediate results before the end):
1. GSM8K's own format: a line `#### N`;
2. "the (final) answer is N" / "answer: N" (free form, any case, an optional `$` or `\\boxed{}` around N);
3. `\\boxed{N}`.
A rationale with none of these has no parseable answer (`None`): it is kept out of training and counted.
"""
from __future__ import annotations

import re
from fractions import Fraction

_NUMBER = r"-?\$?\s*\d[\d,]*(?:\.\d+)?|-?\$?\s*\.\d+"
_PATTERNS = (
    re.compile(r"####\s*(" + _NUMBER + ")"),
    re.compile(r"(?:final answer|the answer|answer)\s*(?:is|:|=)?\s*[:=]?\s*(?:\\boxed\{\s*)?\**\s*(" + _NUMBER + ")",
               re.IGNORECASE),
    re.compile(r"\\boxed\{\s*(" + _NUMBER + r")\s*\}"),
)


def normalize_number(text: str) -> Fraction | None:
    """'1,200' / '$1200.00' / '-3' -> an exact Fraction; None when `text` is not a number."""
    cleaned = text.replace(",", "").replace("$", "").replace(" ", "").strip().rstrip(".")
    if not cleaned or cleaned in ("-", "."):
        return None
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(text: str) -> str | None:
    """The final answer a rationale states, as written (see the module docstring), or None."""
    for pattern in _PATTERNS:
        found = pattern.findall(text or "")
        if found:
            return found[-1].strip()
    return None


def answers_match(predicted: str | None, gold: str) -> bool:
    """Exact numeric match (GSM8K's metric): 1,200 == 1200.0; anything unparseable is wrong."""
    if predicted is None:
        return False
    p, g = normalize_number(predicted), normalize_number(gold)
    return p is not None and g is not None and p == g


def strip_calculator_notes(rationale: str) -> str:
    """GSM8K's reference rationales carry `<<48/2=24>>` calculator annotations; a model should not learn them."""
    return re.sub(r"<<[^>]*>>", "", rationale)
