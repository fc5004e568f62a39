"""Stage 1 of rationale distillation: sample N rationales per question from the teacher, shard by shard.

Why shards: generating thousands of rationales takes hours on real models; each shard of questions is written
(atomically, as a `datasets` dataset) as soon as it is done, so an interrupted stage resumes at the first
missing shard and never redoes a finished question. The backend is built only when a shard is missing.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable

from ..errors import ConfigError
from .generation import GenerationBackend, SamplingSpec, chat_prompt

log = logging.getLogger(__name__)

COLUMNS = ("question_id", "question", "gold", "reference", "sample", "rationale", "num_tokens", "finish_reason")


def question_prompt(tokenizer, question: str, instruction: str, prefix: str = "") -> str:
    """The chat prompt for one question: the task prefix (step-by-step tasks), the question, the instruction."""
    text = f"{prefix}{question.strip()}" + (f"\n{instruction}" if instruction else "")
    return chat_prompt(tokenizer, text)


def save_dataset(ds, folder: str | Path) -> None:
    """`save_to_disk` through a temporary folder (atomic). An empty dataset is written as its column names only:
    `datasets` cannot load an empty one it saved."""
    import json

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if len(ds):
        ds.save_to_disk(str(tmp))
    else:
        tmp.mkdir(parents=True)
        (tmp / "empty_dataset.json").write_text(json.dumps({"columns": ds.column_names}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def load_dataset(folder: str | Path):
    import json

    import datasets

    folder = Path(folder)
    if (folder / "empty_dataset.json").is_file():
        cols = json.loads((folder / "empty_dataset.json").read_text())["columns"]
        return datasets.Dataset.from_dict({c: [] for c in cols})
    return datasets.load_from_disk(str(folder))


def dataset_done(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / "dataset_info.json").is_file() or (folder / "empty_dataset.json").is_file()


def _shard_layout(shards_dir: Path, shard_size: int) -> int:
    """The stage's shard size: the one recorded when its first shard was written, else `shard_size` (recorded)."""
    import json

    layout = shards_dir / "layout.json"
    if layout.is_file():
        recorded = int(json.loads(layout.read_text())["shard_size"])
        if recorded != shard_size:
            log.info("generation resumes with the shard size it began with (%d, not %d)", recorded, shard_size)
        return recorded
    layout.write_text(json.dumps({"shard_size": shard_size}))
    return shard_size


def generate_rationales(questions, tokenizer, make_backend: Callable[[], GenerationBackend], out_dir: str | Path,
                        spec: SamplingSpec, instruction: str, shard_size: int = 32, progress: bool = True,
                        should_stop: Callable[[], bool] | None = None):
    """`questions` (a `datasets.Dataset` with question / final_answer / answer) -> one row per sampled rationale.

    Shards go to OUT/shards/shard-NNNNN; the whole set to OUT/rationales. Returns the whole `Dataset`, or None
    when `should_stop()` turned true after a shard (Ctrl-C): the finished shards are kept for the next call.
    The shard size a stage began with (OUT/shards/layout.json) is kept when it resumes, whatever `shard_size` says:
    shard N must hold the same questions in every call.
    """
    import datasets
    from tqdm.auto import tqdm

    missing = {"question", "final_answer"} - set(questions.column_names)
    if missing:
        raise ConfigError(f"the question dataset lacks columns {sorted(missing)} (has {questions.column_names}); "
                          "rationale distillation needs `question` and a gold `final_answer`")
    if shard_size < 1:
        raise ConfigError(f"cot.shard_size must be >= 1, got {shard_size}")
    out = Path(out_dir)
    shards_dir = out / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    shard_size = _shard_layout(shards_dir, shard_size)
    n = len(questions)
    starts = list(range(0, n, shard_size))
    backend = None
    done = 0
    for start in tqdm(starts, desc="generate (shards)", disable=not progress):
        folder = shards_dir / f"shard-{start // shard_size:05d}"
        if dataset_done(folder):
            done += 1
            continue
        if backend is None:
            backend = make_backend()
        rows = questions.select(range(start, min(start + shard_size, n)))
        prompts = [question_prompt(tokenizer, q, instruction) for q in rows["question"]]
        outputs = backend.generate(prompts, spec)
        table = {c: [] for c in COLUMNS}
        refs = rows["answer"] if "answer" in rows.column_names else [""] * len(rows)
        for i, (q, gold, ref, comps) in enumerate(zip(rows["question"], rows["final_answer"], refs, outputs)):
            for k, c in enumerate(comps):
                for col, val in zip(COLUMNS, (start + i, q, str(gold), ref, k, c.text, c.num_tokens, c.finish_reason)):
                    table[col].append(val)
        save_dataset(datasets.Dataset.from_dict(table), folder)
        if should_stop is not None and should_stop() and start != starts[-1]:
            log.info("generation stopped after shard %d of %d (Ctrl-C); a rerun continues it", start // shard_size + 1,
                     len(starts))
            return None
    if done:
        log.info("generation resumed: %d of %d shards were already done", done, len(starts))
    parts = [load_dataset(shards_dir / f"shard-{s // shard_size:05d}") for s in starts]
    whole = datasets.concatenate_datasets(parts) if parts else datasets.Dataset.from_dict({c: [] for c in COLUMNS})
    save_dataset(whole, out / "rationales")
    return load_dataset(out / "rationales")
