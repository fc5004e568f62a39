"""Text for LM distillation: a list of strings from a named set, the Hub, or local files; packed into blocks.

Sources (`data.name`):
- ``gsm8k``: `$KDKIT_DATA_DIR/gsm8k/{train,test}.jsonl` (or the Hub online); text = question + "\\n" + answer.
- ``chain_sum``: reasoning-gym chain sums, generated offline (`kdkit.data.chain_sum`); text = question + "\\n" + answer.
- ``gsm8k+chain_sum`` (named sets joined by ``+``): their texts alternating, with a ``source`` column naming each
  text's set (what `llm.multi_teacher.route_by=source` routes on).
- ``hf:<dataset>[:<config>]``: `datasets.load_dataset`; offline only from the local Hugging Face cache.
- ``jsonl:PATH``: chat, ShareGPT or Alpaca records (`prompt_records`); text = question + "\n" + reference reply.
- a local file (.jsonl/.json/.parquet/.txt/.csv) = the train split; a path with ``{split}`` in it
  (``data/{split}.jsonl``), or a folder holding ``train.jsonl``/``test.jsonl``/..., gives each split its own file.
  A malformed file or row is refused in one line naming the file and the line (`kdkit.data.text_files`).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..data.hub import load_hub_split
from ..data.paths import cache_dir
from ..errors import ConfigError, MissingDatasetError

SPLITS = ("train", "test", "validation")
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def _gsm8k(split: str):
    from ..data.gsm8k import SPLITS as GSM_SPLITS, load_gsm8k

    if split not in GSM_SPLITS:
        raise ConfigError(f"GSM8K has no {split!r} split; it has {', '.join(GSM_SPLITS)}")
    return load_gsm8k(split)


def local_file(name: str, split: str) -> Path:
    """The file holding `split` of a local dataset path (see the module docstring for the three forms)."""
    path = Path(name.replace("{split}", split)).expanduser()
    if "{split}" in name:
        files = [path]
    elif path.is_dir():
        files = [path / f"{split}{ext}" for ext in BUILDERS]
    elif split == "train":
        files = [path]
    else:
        raise ConfigError(f"{name} is a single file, used as the train split; for a {split!r} split pass a path "
                          f"with {{split}} in it (e.g. data/{{split}}.jsonl) or a folder holding {split}.jsonl")
    found = [f for f in files if f.is_file()]
    if not found:
        looked = "\n".join(f"  - {f}" for f in files)
        raise MissingDatasetError(f"no {split!r} split for data {name!r}; looked for:\n{looked}")
    if found[0].suffix not in BUILDERS:
        raise ConfigError(f"{found[0]}: unsupported file type; use one of {', '.join(BUILDERS)}")
    return found[0]


def _local(path: Path, split: str):
    from ..data.text_files import load_data_file

    return load_data_file(path, BUILDERS[path.suffix], split, cache_dir() / "hf_datasets")


NAMED = ("gsm8k", "chain_sum")  # built-in question/answer sets, and what `+` joins


def _named_rows(name: str, split: str) -> list[tuple[str, str]]:
    """(text, source) of a built-in set, or of several joined by `+`, alternating until each runs out."""
    from itertools import zip_longest

    parts = name.split("+")
    bad = [p for p in parts if p not in NAMED]
    if bad or len(set(parts)) != len(parts):
        raise ConfigError(f"data.name={name}: join distinct built-in sets ({', '.join(NAMED)}) with '+', e.g. "
                          "gsm8k+chain_sum")
    sets = []
    for part in parts:
        if part == "gsm8k":
            ds = _gsm8k(split)
        else:
            from ..data import load_chain_sum

            if split not in ("train", "test"):
                raise ConfigError(f"chain_sum has no {split!r} split for text; it has train, test")
            ds = load_chain_sum(split)
        sets.append([(q + "\n" + a, part) for q, a in zip(ds["question"], ds["answer"])])
    return [row for group in zip_longest(*sets) for row in group if row is not None]


def is_named(name: str) -> bool:
    """A built-in set or a `+` join of them (no files to check)."""
    return name != "gsm8k" and all(p in NAMED for p in name.split("+"))


def _looks_like_path(name: str) -> bool:
    return "/" in name or "{split}" in name or Path(name).suffix in BUILDERS or Path(name).expanduser().exists()


def _first(ds, limit: int | None):
    if limit is None:
        return ds
    if limit < 1:
        raise ConfigError(f"limit must be a positive number of texts, got {limit}")
    return ds.select(range(min(limit, len(ds))))


def _open(name: str, split: str, limit: int | None):
    """(the first `limit` rows of a Hub or local dataset, its local file or None)."""
    if name.startswith("hf:"):
        return _first(load_hub_split(name[3:], split), limit), None
    if _looks_like_path(name):
        local = local_file(name, split)
        return _first(_local(local, split), limit), local
    raise ConfigError(f"unknown text dataset {name!r}; use gsm8k, chain_sum, built-in sets joined by '+' "
                      f"(gsm8k+chain_sum), hf:<dataset>[:<config>], or a local .jsonl/.json/.parquet/.txt/.csv file "
                      f"(or a {{split}} pattern / folder of them)")


def load_column(name: str, split: str, column: str, limit: int | None = None) -> list:
    """Column `column` of `split`, row for row with `load_texts` (e.g. the source that routes each text to a teacher)."""
    _check_split(split)
    if is_named(name) and "+" in name and column == "source":
        rows = _named_rows(name, split)
        return [src for _, src in (rows[:limit] if limit is not None else rows)]
    if name in NAMED or is_named(name) or name.startswith("jsonl:"):
        raise ConfigError(f"data.name={name} has question/answer texts and no column {column!r}; a column per text "
                          "needs a local .jsonl/.json/.parquet/.csv file, an hf: dataset, or sets joined by '+' "
                          "(column 'source')")
    ds, _ = _open(name, split, limit)
    if column not in ds.column_names:
        raise ConfigError(f"dataset {name!r} ({split}) has no column {column!r}; columns: {', '.join(ds.column_names)}")
    return list(ds[column])


def load_texts(name: str, split: str, text_field: str | None = None, limit: int | None = None) -> list[str]:
    """The texts of `split` of dataset `name`, in file order, the first `limit` of them when given."""
    _check_split(split)
    local = None
    if is_named(name):
        if text_field is not None:
            raise ConfigError(f"data.name={name} makes its texts from question + answer; drop llm.text_field")
        rows = _named_rows(name, split)
        return [t for t, _ in (rows[:limit] if limit is not None else rows)]
    if name == "gsm8k":
        ds = _first(_gsm8k(split), limit)
    elif name.startswith("jsonl:"):
        from .prompt_records import load_prompt_records

        records = load_prompt_records(name, split)
        texts = [q + ("\n" + a if a else "") for q, a in zip(records["question"], records["answer"])]
        return texts[:limit] if limit is not None else texts
    else:
        ds, local = _open(name, split, limit)
    if name == "gsm8k" and text_field is None:
        return [q + "\n" + a for q, a in zip(ds["question"], ds["answer"])]
    field = text_field or "text"
    if field not in ds.column_names:
        raise ConfigError(f"dataset {name!r} ({split}) has no column {field!r}; columns: "
                          f"{', '.join(ds.column_names)} (choose one with llm.text_field)")
    if local is not None:  # a malformed row is named by file and line
        from ..data.text_files import require_text

        require_text(ds, (field,), local, BUILDERS[local.suffix])
    texts = ds[field]
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise ConfigError(f"column {field!r} of {name!r} holds {type(bad).__name__} values, not text")
    return list(texts)


def adds_bos(tokenizer) -> bool:
    """True when the tokenizer puts a BOS in front of text by default (Llama-2, Gemma), False for SmolLM2/GPT-2."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_special[:1] == [bos] and plain[:1] != [bos]


def pack_blocks(texts: list[str], tokenizer, block_size: int, add_eos: bool = True) -> torch.Tensor:
    """Token blocks [n_blocks, block_size]: each text tokenized without special tokens, EOS after each, joined,
    cut into full blocks; the tail that does not fill a block is dropped.

    A BOS goes before each text only when the tokenizer adds one by default: models trained that way (Llama-2,
    Gemma) expect it at document starts, and their perplexity is off without it; SmolLM2-style tokenizers add
    none, so none is inserted. Deterministic: the same texts and tokenizer give the same tensor.
    """
    if block_size < 2:
        raise ConfigError(f"block_size must be at least 2 tokens, got {block_size}")
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise ConfigError("the tokenizer has no EOS token to separate texts; pass add_eos=False or set one")
    prefix = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    suffix = [eos] if add_eos else []
    ids: list[int] = []
    if texts:
        for seq in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
            ids.extend(prefix)
            ids.extend(seq)
            ids.extend(suffix)
    n = len(ids) // block_size
    if n == 0:
        raise ConfigError(f"{len(texts)} texts give {len(ids)} tokens, fewer than one block of {block_size}: "
                          "use more texts or a smaller llm.block_size")
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)
