"""Bring-your-own questions for rationale distillation: ``data.name=jsonl:PATH`` or ``data.name=hf:<dataset>``.

Each record is one question in one of the formats users keep their prompts in:
- chat (OpenAI messages): ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``;
- ShareGPT: ``{"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]}``;
- instruction (Alpaca): ``{"instruction": ..., "input": ..., "output": ...}`` (``input`` optional).

The question is the last user turn (Alpaca: instruction + input); a system turn is kept in front of it. The gold
answer is the record's ``answer`` field when it has one (any format), else the answer the reference reply (the
last assistant turn / ``output``) states: ``#### N``, "the answer is N", ``\\boxed{N}``, else its last line. The
reference reply, when there is one, is the dataset's own rationale (`cot.short_ratio`, REDI's reference
positives). Splits: ``jsonl:PATH`` is the train split; ``jsonl:data/{split}.jsonl`` names one file per split.
A record that is not JSON, has no question, or no answer is refused naming the file and the line.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError, DataFileError, MissingDatasetError
from .answer_checks import stated_text
from .answers import extract_answer

PREFIXES = ("jsonl:", "hf:")
USER_ROLES, ASSISTANT_ROLES, SYSTEM_ROLES = ("user", "human"), ("assistant", "gpt", "bot", "model"), ("system",)


def is_prompt_source(name: str) -> bool:
    return str(name).startswith(PREFIXES)


def parse_record(record, where: str) -> dict:
    """{question, answer (the reference rationale or ''), final_answer} of one record; `where` names it in errors."""
    if not isinstance(record, dict):
        raise DataFileError(f"{where}: expected a JSON object (chat, ShareGPT or Alpaca record), got "
                            f"{type(record).__name__}")
    if "messages" in record or "conversations" in record:
        key = "messages" if "messages" in record else "conversations"
        turns = record[key]
        if not isinstance(turns, list) or not turns:
            raise DataFileError(f"{where}: '{key}' must be a non-empty list of turns")
        parsed = []
        for i, turn in enumerate(turns):
            role = turn.get("role", turn.get("from")) if isinstance(turn, dict) else None
            text = turn.get("content", turn.get("value")) if isinstance(turn, dict) else None
            if not isinstance(role, str) or not isinstance(text, str):
                raise DataFileError(f"{where}: turn {i} of '{key}' needs a role ('role' or 'from') and text "
                                    "('content' or 'value')")
            parsed.append((role.lower(), text))
        users = [i for i, (role, _) in enumerate(parsed) if role in USER_ROLES]
        if not users:
            raise DataFileError(f"{where}: no user turn (role user / from human) to ask")
        system = "\n".join(t for role, t in parsed[: users[-1]] if role in SYSTEM_ROLES)
        question = (system + "\n\n" if system else "") + parsed[users[-1]][1]
        replies = [t for role, t in parsed[users[-1] + 1:] if role in ASSISTANT_ROLES]
        reference = replies[-1] if replies else ""
    elif "instruction" in record:
        instruction, extra = record.get("instruction"), record.get("input") or ""
        if not isinstance(instruction, str) or not isinstance(extra, str):
            raise DataFileError(f"{where}: Alpaca 'instruction' and 'input' must be text")
        question = instruction + ("\n\n" + extra if extra.strip() else "")
        reference = record.get("output") or ""
        if not isinstance(reference, str):
            raise DataFileError(f"{where}: Alpaca 'output' must be text")
    else:
        raise DataFileError(f"{where}: unknown record format (keys {sorted(record)}); expected 'messages' (chat), "
                            "'conversations' (ShareGPT) or 'instruction' (Alpaca)")
    if not question.strip():
        raise DataFileError(f"{where}: the question is empty")
    gold = record.get("answer")
    if gold is None and reference:
        gold = extract_answer(reference) or stated_text(reference)
    if gold is None or not str(gold).strip():
        raise DataFileError(f"{where}: no gold answer: add an 'answer' field, or a reply that states one "
                            "('#### N', 'The answer is N')")
    return {"question": question.strip(), "answer": reference, "final_answer": str(gold).strip()}


def load_prompt_records(name: str, split: str):
    """The questions of `split` of ``jsonl:PATH`` / ``hf:<dataset>[:<config>]`` as a `datasets.Dataset` with
    columns question / answer / final_answer."""
    import datasets

    if name.startswith("jsonl:"):
        path = Path(name[len("jsonl:"):].replace("{split}", split)).expanduser()
        if "{split}" not in name and split != "train":
            raise ConfigError(f"data.name={name} is one file, the train split; for a {split!r} split name one file "
                              "per split: jsonl:data/{split}.jsonl")
        if not path.is_file():
            raise MissingDatasetError(f"data.name={name}: no file {path} ({split} split)")
        rows = []
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFileError(f"{where}: not JSON ({e.msg})") from None
            rows.append(parse_record(record, where))
        if not rows:
            raise DataFileError(f"{path}: no records")
        return datasets.Dataset.from_list(rows)
    from ..data.hub import load_hub_split

    ds = load_hub_split(name[len("hf:"):], split)
    return datasets.Dataset.from_list([parse_record(r, f"{name} ({split}) record {i}") for i, r in enumerate(ds)])
