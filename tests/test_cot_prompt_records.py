"""Bring-your-own questions for rationale distillation (`data.name=jsonl:PATH`): chat, ShareGPT and Alpaca
records, the gold answer from a field or the reference reply, the answer checks, and errors naming file and line."""
import json
import sys
import textwrap

import pytest

from kdkit.cli import main
from kdkit.errors import ConfigError, DataFileError
from kdkit.llm.answer_checks import answer_check
from kdkit.llm.cot_filter import filter_rationales
from kdkit.llm.prompt_records import load_prompt_records, parse_record

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 3 ="},
                     {"role": "assistant", "content": "2 + 3 = 5\nThe answer is 5."}]}
SHAREGPT = {"conversations": [{"from": "human", "value": "What is 7 - 4?"}, {"from": "gpt", "value": "#### 3"}]}
ALPACA = {"instruction": "Capital of France?", "input": "", "output": "It is Paris.\nThe answer is Paris.",
          "answer": "Paris"}


def _write(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_chat_sharegpt_and_alpaca_records():
    assert parse_record(CHAT, "x") == {"question": "Be brief.\n\n2 + 3 =", "answer": "2 + 3 = 5\nThe answer is 5.",
                                       "final_answer": "5"}
    assert parse_record(SHAREGPT, "x") == {"question": "What is 7 - 4?", "answer": "#### 3", "final_answer": "3"}
    assert parse_record(ALPACA, "x")["final_answer"] == "Paris"  # the answer field wins over the reply
    no_reply = {"messages": [{"role": "user", "content": "1 + 1 ="}], "answer": 2}
    assert parse_record(no_reply, "x") == {"question": "1 + 1 =", "answer": "", "final_answer": "2"}
    with_input = {"instruction": "Add.", "input": "4 and 5", "output": "9"}
    assert parse_record(with_input, "x") == {"question": "Add.\n\n4 and 5", "answer": "9", "final_answer": "9"}


@pytest.mark.parametrize("record, says", [
    ('{"messages": [{"role": "user", "content": "1 + 1 ="}]', "not JSON"),
    ({"messages": [{"role": "assistant", "content": "5"}]}, "no user turn"),
    ({"messages": [{"role": "user"}]}, "turn 0 of 'messages' needs a role"),
    ({"messages": [{"role": "user", "content": "1 + 1 ="}]}, "no gold answer"),
    ({"prompt": "hi", "completion": "ho"}, "unknown record format"),
    ({"instruction": "  ", "output": "#### 1"}, "the question is empty"),
    ([1, 2], "expected a JSON object"),
])
def test_a_malformed_record_is_named_by_file_and_line(record, says, tmp_path):
    path = _write(tmp_path / "q.jsonl", [CHAT, record])
    with pytest.raises(DataFileError) as e:
        load_prompt_records(f"jsonl:{path}", "train")
    assert str(e.value).startswith(f"{path}:2: ") and says in str(e.value)


def test_splits_and_missing_files(tmp_path):
    _write(tmp_path / "train.jsonl", [CHAT, SHAREGPT])
    _write(tmp_path / "test.jsonl", [ALPACA])
    spec = f"jsonl:{tmp_path}/{{split}}.jsonl"
    assert len(load_prompt_records(spec, "train")) == 2 and load_prompt_records(spec, "test")["final_answer"] == ["Paris"]
    with pytest.raises(ConfigError, match="one file, the train split"):
        load_prompt_records(f"jsonl:{tmp_path}/train.jsonl", "test")
    with pytest.raises(Exception, match="no file"):
        load_prompt_records(f"jsonl:{tmp_path}/nope.jsonl", "train")


def test_answer_checks(tmp_path, monkeypatch):
    numeric, exact = answer_check("numeric"), answer_check("exact")
    assert numeric("So 1,200 in all.\nThe answer is 1200.", "1,200") and not numeric("The answer is Paris.", "Paris")
    assert exact("It is Paris.\nThe answer is **Paris**.", "paris") and exact("#### B", "B")
    assert not exact("The answer is Lyon.", "Paris")
    (tmp_path / "mycheck.py").write_text(textwrap.dedent("""
        def choice(completion, gold):
            return completion.strip().endswith(f"({gold})")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    user = answer_check("mycheck:choice")
    assert user("I pick (B)", "B") and not user("I pick (C)", "B")
    for bad in ("fuzzy", "mycheck:nope", "nomodule_xyz:f", ":f"):
        with pytest.raises(ConfigError, match="cot.answer_check"):
            answer_check(bad)
    sys.modules.pop("mycheck", None)


def test_the_filter_keeps_what_the_check_accepts():
    import datasets

    rows = datasets.Dataset.from_dict({"question_id": [0, 0, 1], "rationale": ["The answer is Paris.", "Lyon.",
                                                                                "The answer is 4."],
                                       "gold": ["Paris", "Paris", "4"]})
    correct, incorrect, stats = filter_rationales(rows, answer_check("exact"))
    assert (stats["correct"], stats["incorrect"], stats["unparseable"]) == (2, 1, 0)
    assert incorrect["predicted"] == ["Lyon"]
    _, _, numeric_stats = filter_rationales(rows)  # numeric: the two word answers state no number
    assert (numeric_stats["correct"], numeric_stats["unparseable"]) == (1, 2)


def test_a_bad_record_stops_the_recipe_before_any_work(tmp_path, capsys):
    path = _write(tmp_path / "q.jsonl", [CHAT, SHAREGPT, {"messages": []}])
    out = tmp_path / "runs"
    args = ["distill", "recipe=cot-math-small", f"data.name=jsonl:{path}", "cot.eval_splits=[train]",
            f"output_dir={out}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"kdkit: error: {path}:3: 'messages' must be a non-empty list")
    assert not out.exists()
    assert main([*args[:2], f"data.name=jsonl:{path}", "cot.answer_check=nomodule_xyz:f", f"output_dir={out}"]) == 2
    assert "cot.answer_check" in capsys.readouterr().err


def test_lm_distillation_reads_the_same_records_as_text(tmp_path):
    from kdkit.llm.text_data import load_texts

    path = _write(tmp_path / "q.jsonl", [CHAT, SHAREGPT])
    assert load_texts(f"jsonl:{path}", "train") == ["Be brief.\n\n2 + 3 =\n2 + 3 = 5\nThe answer is 5.",
                                                    "What is 7 - 4?\n#### 3"]


@pytest.mark.usefixtures("one_thread")
def test_the_pipeline_runs_on_records_with_the_exact_check(tmp_path, tiny_dir):
    """Chat + ShareGPT + Alpaca records through every stage (generation, filter, SFT with the dataset's rationales
    mixed in, evaluation) with the exact check; the report names the check the evaluation used."""
    _write(tmp_path / "train.jsonl", [CHAT, SHAREGPT, ALPACA, {**CHAT, "answer": "5"}])
    _write(tmp_path / "test.jsonl", [ALPACA, SHAREGPT])
    args = ["distill", "recipe=cot-math-small", f"teacher.model={tiny_dir}", "student.model=truncated-teacher", "student.options={layers: 1}",
            f"data.name=jsonl:{tmp_path}/{{split}}.jsonl", "cot.answer_check=exact", "cot.samples=1",
            "cot.max_new_tokens=6", "cot.eval_max_new_tokens=6", "cot.short_ratio=1.0", "cot.redi=false",
            "cot.sft_epochs=1", "data.batch_size=2", "trainer.progress=false", f"output_dir={tmp_path / 'runs'}",
            "name=byo", "trainer.threads=1"]
    assert main(args) == 0
    run = tmp_path / "runs" / "byo"
    report = json.loads((run / "report.json").read_text())
    assert report["filter"]["generated"] == 4 and report["test_questions"] == 2
    assert report["sft_stats"]["examples"] == 4  # every question carries the record's own rationale
    saved = json.loads((run / "eval" / "student_sft.json").read_text())
    assert saved["settings"]["answer_check"] == "exact" and saved["questions"] == 2
