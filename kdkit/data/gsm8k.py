"""GSM8K grade-school math word problems as a `datasets.Dataset` with a parsed `final_answer` column.

Source: `$KDKIT_DATA_DIR/gsm8k/{train,test}.jsonl` (fields `question`, `answer`), else, online, the Hub's
`openai/gsm8k` (config `main`). Offline with no local file raises `MissingDatasetError`.
"""
from __future__ import annotations

from ..registry import DATASETS
from .paths import cache_dir, data_dir, is_offline, missing_dataset_error

SPLITS = ("train", "test")
HUB_ID = "openai/gsm8k"
HUB_CONFIG = "main"


def extract_final_answer(answer: str) -> str:
    """The text after the last `####` of a GSM8K rationale, commas removed and stripped ("" if there is none)."""
    head, sep, tail = answer.rpartition("####")
    return tail.replace(",", "").strip() if sep else ""


def _add_final_answer(batch: dict) -> dict:
    return {"final_answer": [extract_final_answer(a) for a in batch["answer"]]}


def load_gsm8k(split: str = "train"):
    """GSM8K `split` ("train": 7,473 rows, "test": 1,319) with columns `question`, `answer`, `final_answer`."""
    if split not in SPLITS:
        raise ValueError(f"unknown GSM8K split '{split}'. Splits: {', '.join(SPLITS)}")
    import datasets

    local = data_dir() / "gsm8k" / f"{split}.jsonl"
    if local.is_file():
        ds = datasets.load_dataset(
            "json", data_files={split: str(local)}, split=split, cache_dir=str(cache_dir() / "hf_datasets")
        )
    elif is_offline():
        raise missing_dataset_error(
            f"GSM8K ({split} split)",
            [data_dir() / "gsm8k" / f"{s}.jsonl" for s in SPLITS],
            "gsm8k/train.jsonl and gsm8k/test.jsonl (JSON lines with fields `question` and `answer`, "
            "the answer ending in a line `#### N`)",
            download=f"the Hub dataset '{HUB_ID}' (config '{HUB_CONFIG}')",
        )
    else:
        ds = datasets.load_dataset(HUB_ID, HUB_CONFIG, split=split)
    missing = {"question", "answer"} - set(ds.column_names)
    if missing:
        raise ValueError(f"GSM8K source {local if local.is_file() else HUB_ID} lacks columns {sorted(missing)}")
    if "final_answer" in ds.column_names:
        ds = ds.remove_columns("final_answer")
    return ds.map(_add_final_answer, batched=True, desc=None)


if "gsm8k" not in DATASETS:
    DATASETS.register("gsm8k", load_gsm8k)
