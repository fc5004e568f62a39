"""The chain-sum CoT task (reasoning-gym's generator, kdkit's rationales): rationales by hand, the answer checker
on what models write, disjoint splits, and the recipes' rules (teacher training with `kdkit train`, eval splits)."""
import pytest

from kdkit.cli import main
from kdkit.data.chain_sum import SPLITS, load_chain_sum, rationale
from kdkit.errors import ConfigError
from kdkit.llm.answers import answers_match, extract_answer
from kdkit.llm.cot_sft import build_sft_examples, reference_rationale

pytest.importorskip("reasoning_gym")


def test_rationale_by_hand():
    assert rationale("41 - 7 + 85") == ("41 - 7 = 34\n34 + 85 = 119\n#### 119", 119)
    assert rationale("3 - 9 - 1") == ("3 - 9 = -6\n-6 - 1 = -7\n#### -7", -7)
    assert rationale("5 + 0") == ("5 + 0 = 5\n#### 5", 5)
    for bad in ("41 * 7", "41 -", "41 - - 7"):
        with pytest.raises(ConfigError):
            rationale(bad)


def test_answer_checker_on_what_models_write():
    text = reference_rationale("3 - 9 = -6\n-6 - 1 = -7\n#### -7", "-7")
    assert text == "3 - 9 = -6\n-6 - 1 = -7\nThe answer is -7."
    assert answers_match(extract_answer(text), "-7")
    assert answers_match(extract_answer("-6 - 1 = -7\nThe answer is -7."), "-7")
    assert not answers_match(extract_answer("-6 - 1 = -7\nThe answer is 7."), "-7")  # the sign counts
    assert not answers_match(extract_answer("-6 - 1 = -7"), "-7")  # no stated answer: unparseable, wrong


@pytest.fixture(scope="module")
def splits():
    return {s: load_chain_sum(s) for s in SPLITS}


def test_splits_are_held_out_and_the_hard_one_is_longer(splits):
    train, test, hard = (set(splits[s]["question"]) for s in ("train", "test", "hard"))
    assert not train & test and not train & hard
    assert len(test) == len(splits["test"]) >= 1000 and len(hard) == len(splits["hard"]) >= 1000  # no repeats
    assert set(splits["train"]["terms"]) == {2, 3, 4} and set(splits["hard"]["terms"]) == {5, 6}
    for row in list(splits["hard"])[:50]:  # every row's rationale is its question's, and its last line the answer
        text, total = rationale(row["question"].rstrip(" ="))
        assert text == row["answer"] and str(total) == row["final_answer"]
        assert len(text.splitlines()) == row["terms"]  # one line per step, plus '#### N'


def test_reference_sft_examples_are_the_datasets_rationales(splits):
    rows = build_sft_examples(None, splits["train"].select(range(3)), "reference", "Step by step.")
    first = splits["train"][0]
    assert rows[0]["prompt"][0]["content"] == f"{first['question']}\nStep by step."
    assert rows[0]["completion"][0]["content"] == reference_rationale(first["answer"], first["final_answer"])


@pytest.mark.parametrize("args, says", [
    (["train", "recipe=cot-chainsum-teacher", "cot.sft=rationale"], "cot.sft=reference"),
    (["distill", "recipe=cot-chainsum-teacher", "teacher.model=smollm2-135m-instruct"], "kdkit train"),
    (["train", "recipe=cot-chainsum-teacher", "cot.eval_splits=[test, easy]"], "cot.eval_splits"),
    (["train", "recipe=cot-chainsum-teacher", "data.name=gsm8k", "cot.eval_splits=[hard]"], "cot.eval_splits"),
    (["train", "recipe=cot-chainsum-teacher", "data.name=cifar10"], "data.name"),
    (["train", "recipe=cot-chainsum-teacher", "trainer.mixed_precision=fp16"], "trainer.mixed_precision"),
    (["distill", "recipe=cot-chainsum", "teacher.model=/nonexistent/teacher"], "teacher.model"),
])
def test_recipe_rules_give_one_line_before_any_work(args, says, capsys, tmp_path):
    assert main([*args, f"output_dir={tmp_path}", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdkit: error:") and says in err[0]
    assert not any(tmp_path.iterdir())


def test_the_shipped_recipes_resolve(capsys):
    assert main(["train", "recipe=cot-chainsum-teacher", "--dry-run"]) == 0
    assert main(["distill", "recipe=cot-chainsum", "teacher.model=smollm2-135m-instruct", "--dry-run"]) == 0


def test_cot_math_names_hub_models_and_offline_says_what_to_run_instead(capsys, tmp_path):
    """recipe=cot-math is sized for a GPU with the Hub (a Qwen2.5-Math teacher, a Qwen2.5 student); offline it
    stops before any work with one line naming the missing model and the offline alternatives."""
    from kdkit.config import load_recipe

    r = load_recipe("cot-math", [])
    assert r.teacher.model.startswith("hf:Qwen/") and r.student.model.startswith("hf:Qwen/")
    assert main(["distill", "recipe=cot-math", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdkit: error: teacher.model=hf:Qwen/Qwen2.5-Math-1.5B-Instruct is not")
    assert "teacher.model=smollm2-135m-instruct" in err[0] and "recipe=cot-chainsum" in err[0]
    assert not any(tmp_path.iterdir())


def test_resume_reads_an_option_added_since_as_its_default():
    """A run folder written before an option existed resumes when the option keeps its default; a changed value
    is still refused."""
    from kdkit.run import config_changes

    old = {"cot": {"sft": "rationale"}}
    defaults = {"cot": {"sft": "rationale", "kd_topk": 0, "answer_check": "numeric"}}
    assert config_changes(old, {"cot": {"sft": "rationale", "kd_topk": 0, "answer_check": "numeric"}}, (),
                          defaults) == []
    assert config_changes(old, {"cot": {"sft": "rationale", "kd_topk": 32}}, (), defaults) == ["cot.kd_topk: 0 -> 32"]
    assert config_changes(old, {"cot": {"sft": "rationale", "kd_topk": 0}}, ()) == ["cot.kd_topk: '<unset>' -> 0"]
