"""Chain sums (reasoning-gym's ``chain_sum``): "4 - 7 + 8 =", an offline multi-step arithmetic task for CoT
distillation on a CPU.

Why this task: every question is a chain of two-operand steps, so a step-by-step rationale ("4 - 7 = -3",
"-3 + 8 = 5") turns one hard computation into several easy ones. A small student trained on rationales can
then beat one trained on answers alone, and a split with longer chains than training saw (`hard`) asks whether
it learned the procedure or the lengths. Questions come from reasoning-gym's procedural generator (seeded; no
download); the rationale and the GSM8K-style ``#### N`` line are kdkit's, from the parsed expression.

Splits (columns ``question``, ``answer`` = rationale ending in ``#### N``, ``final_answer``, ``terms``):
- ``train``: 2-4 one-digit terms;
- ``test``: the same distribution, without the questions that are in ``train`` (which removes most two-term
  one-digit ones: there are only 200 of those);
- ``hard``: 5-6 one-digit terms (longer chains than any training question).

One digit, because the teachers this machine can fine-tune cannot add two-digit numbers reliably: SmolLM2-135M
fine-tuned on 1,000 mixed questions answered 29-38% of the two-digit ones (4% at four terms) against 61-79% of
the one-digit ones.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..registry import DATASETS


@dataclass(frozen=True)
class ChainSplit:
    seed: int
    size: int
    min_terms: int
    max_terms: int
    min_digits: int = 1
    max_digits: int = 1


# reasoning-gym seeds question i with seed + i: the splits' seed ranges must not overlap
SPLITS = {"train": ChainSplit(seed=0, size=8000, min_terms=2, max_terms=4),
          "test": ChainSplit(seed=1_000_000, size=3000, min_terms=2, max_terms=4),
          "hard": ChainSplit(seed=2_000_000, size=2000, min_terms=5, max_terms=6)}
PREFIX = "State the final answer to the following arithmetic problem: "


def rationale(expression: str) -> tuple[str, int]:
    """(step-by-step rationale ending in '#### N', N) of a chain like '41 - 7 + 85'; one line per operator."""
    tokens = expression.split()
    if len(tokens) % 2 == 0 or any(op not in "+-" or len(op) != 1 for op in tokens[1::2]):
        raise ConfigError(f"not a chain sum: {expression!r}")
    total, lines = int(tokens[0]), []
    for op, value in zip(tokens[1::2], tokens[2::2]):
        new = total + int(value) if op == "+" else total - int(value)
        lines.append(f"{total} {op} {value} = {new}")
        total = new
    return "\n".join(lines + [f"#### {total}"]), total


def _generate(split: ChainSplit) -> list[dict]:
    try:
        from reasoning_gym.arithmetic.chain_sum import ChainSumConfig, ChainSumDataset
    except ImportError as e:
        raise ConfigError("data.name=chain_sum needs reasoning-gym (pip install 'kdkit[llm]' or "
                          "pip install reasoning-gym)") from e
    gen = ChainSumDataset(ChainSumConfig(min_terms=split.min_terms, max_terms=split.max_terms,
                                         min_digits=split.min_digits, max_digits=split.max_digits,
                                         seed=split.seed, size=split.size))
    rows = []
    for item in gen:
        expression = item["metadata"]["expression"]
        text, total = rationale(expression)
        if str(total) != item["answer"]:  # the generator's own answer checks ours
            raise AssertionError(f"chain_sum: {expression} = {item['answer']}, rationale says {total}")
        rows.append({"question": f"{expression} =", "answer": text, "final_answer": item["answer"],
                     "terms": item["metadata"]["num_terms"]})
    return rows


def load_chain_sum(split: str = "train"):
    """Chain-sum `split` (see the module docstring) as a `datasets.Dataset`."""
    import datasets

    if split not in SPLITS:
        raise ConfigError(f"unknown chain_sum split {split!r}; splits: {', '.join(SPLITS)}")
    rows = _generate(SPLITS[split])
    if split != "train":
        seen = {r["question"] for r in _generate(SPLITS["train"])}
        rows = [r for r in rows if r["question"] not in seen]
    unique, kept = set(), []
    for r in rows:  # one copy of each question: repeats would weigh them twice in training and evaluation
        if r["question"] not in unique:
            unique.add(r["question"])
            kept.append(r)
    return datasets.Dataset.from_list(kept)


if "chain_sum" not in DATASETS:
    DATASETS.register("chain_sum", load_chain_sum)
