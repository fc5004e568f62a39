"""GSM8K grade-school math word problems as a `datasets.Dataset` with a parsed `final_answer` column.

Source: `$KDKIT_DATA_DIR/gsm8k/{train,test}.jsonl` (fields `question`, `answer`), else, online, the Hub's
`openai/gsm8k` (config `main`). Offline with no local file raises `MissingDatasetError`.
"""
from __future__ import annotations

from ..errors import ConfigError, DataFileError
from ..registry import DATASETS
from .paths import cache_dir, data_dir, is_offline, missing_dataset_error

SPLITS = ("train", "test")
FIELDS = ("question", "answer")
HUB_ID = "openai/gsm8k"
HUB_CONFIG = "main"


def extract_final_answer(answer: str) -> str:
    """The text after the last `####` of a GSM8K rationale, commas removed and stripped ("" if there is none)."""
    head, sep, tail = answer.rpartition("####")
    return tail.replace(",", "").strip() if sep else ""


def _add_final_answer(batch: dict) -> dict:
    return {"final_answer": [extract_final_answer(a) for a in batch["answer"]]}


def load_gsm8k(split: str = "train"):
    """GSM8K `split` ("train": 7,473 rows, "test": 1,319) with columns `question`, `answer`, `final_answer`.
    A local line that is not JSON, or lacks a text `question` or `answer`, is refused naming the file and line."""
    if split not in SPLITS:
        raise ConfigError(f"unknown GSM8K split '{split}'. Splits: {', '.join(SPLITS)}")
    local = data_dir() / "gsm8k" / f"{split}.jsonl"
    if local.is_file():
        from .text_files import load_data_file

        ds = load_data_file(local, "json", split, cache_dir() / "hf_datasets", text_fields=FIELDS)
    elif is_offline():
        raise _missing(split)
    else:
        import datasets

        try:
            ds = datasets.load_dataset(HUB_ID, HUB_CONFIG, split=split)
        except (ConnectionError, OSError) as e:  # no network: the same message as offline, with the cause
            raise _missing(split, f"the Hub could not be reached: {type(e).__name__}") from None
        missing = sorted(set(FIELDS) - set(ds.column_names))
        if missing:
            raise DataFileError(f"GSM8K source {HUB_ID} lacks columns {missing}")
    if "final_answer" in ds.column_names:
        ds = ds.remove_columns("final_answer")
    return ds.map(_add_final_answer, batched=True, desc=None)


def _missing(split: str, why: str | None = None):
    return missing_dataset_error(
        f"GSM8K ({split} split)",
        [data_dir() / "gsm8k" / f"{s}.jsonl" for s in SPLITS],
        "gsm8k/train.jsonl and gsm8k/test.jsonl (JSON lines with fields `question` and `answer`, "
        "the answer ending in a line `#### N`)",
        download=f"the Hub dataset '{HUB_ID}' (config '{HUB_CONFIG}')", why=why,
    )


if "gsm8k" not in DATASETS:
    DATASETS.register("gsm8k", load_gsm8k)
