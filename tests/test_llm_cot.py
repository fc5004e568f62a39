"""Rationale distillation (`task: cot`): answer parsing, filtering, SFT data and loss, REDI, resumable generation,
and the whole pipeline end to end on GSM8K with a tiny Llama over SmolLM2's real tokenizer and chat template."""
import json
import os

import pytest
import torch

from kdkit.cli import main
from kdkit.errors import ConfigError
from kdkit.llm.answers import answers_match, extract_answer, normalize_number
from kdkit.llm.generation import Completion
from kdkit.llm.models import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

SMOL = "smollm2-135m-instruct"


@pytest.mark.parametrize("text, answer", [
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
    ("so 3 + 4 = 7 apples. The answer is 7.", "7"),
    ("First 5. Then 6. The final answer is $1,250.50", "$1,250.50"),
    ("Answer: -3", "-3"),
    ("We get \\boxed{18}.", "18"),
    ("The answer is: **18**", "18"),
    ("I am not sure what to do here.", None),
    ("", None),
    ("The answer is 4. Wait, the answer is 5.", "5"),  # the last statement wins
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_numeric_match():
    assert answers_match("1,200", "1200") and answers_match("$12.50", "12.5") and answers_match("7.", "7")
    assert not answers_match("7", "8") and not answers_match(None, "7") and not answers_match("seven", "7")
    assert normalize_number("abc") is None and normalize_number("-0.5") == normalize_number("-1/2".replace("1/2", ".5"))


def _rows(items):
    import datasets

    cols = ("question_id", "question", "gold", "reference", "sample", "rationale", "num_tokens", "finish_reason")
    return datasets.Dataset.from_dict({c: [dict(zip(cols, it))[c] for it in items] for c in cols})


def test_filter_keeps_correct_sets_incorrect_aside_and_counts():
    from kdkit.llm.cot_filter import filter_rationales

    rows = _rows([(0, "q0", "72", "", 0, "24 + 48 = 72. The answer is 72.", 9, "stop"),
                  (0, "q0", "72", "", 1, "24 + 48 = 72.  the answer is 72.", 9, "stop"),  # duplicate
                  (0, "q0", "72", "", 2, "48 * 2 = 96. The answer is 96.", 9, "stop"),
                  (1, "q1", "10", "", 0, "I do not know", 4, "length"),  # no answer
                  (1, "q1", "10", "", 1, "   ", 1, "stop"),  # empty
                  (1, "q1", "10", "", 2, "#### 10.0", 3, "stop")])
    correct, incorrect, stats = filter_rationales(rows)
    assert list(correct["sample"]) == [0, 5 - 3] and list(correct["question_id"]) == [0, 1]
    assert list(incorrect["predicted"]) == ["96"]
    assert stats == {"generated": 6, "empty": 1, "unparseable": 1, "duplicates": 1, "correct": 2, "incorrect": 1,
                     "questions": 2, "questions_with_correct": 2, "teacher_sample_accuracy": 2 / 6}


def _questions(n=3):
    import datasets

    return datasets.Dataset.from_dict({
        "question": [f"Question {i}?" for i in range(n)], "final_answer": [str(10 + i) for i in range(n)],
        "answer": [f"Half of 2 is <<2/2=1>>1.\n#### {10 + i}" for i in range(n)]})


def test_sft_examples_per_mode():
    from kdkit.llm.cot_sft import build_sft_examples, reference_rationale

    correct = _rows([(0, "Question 0?", "10", "", 0, "5 + 5 = 10.\nSo the answer is 10", 5, "stop"),
                     (0, "Question 0?", "10", "", 1, "2 * 5 = 10. #### 10", 5, "stop")])
    r = build_sft_examples(correct, _questions(), "rationale", "Think.")
    assert len(r) == 2 and r[0]["prompt"][0]["content"] == "Question 0?\nThink."
    assert r[0]["completion"][0]["content"] == "5 + 5 = 10.\nThe answer is 10."
    a = build_sft_examples(correct, _questions(), "answer_only", "Think.")
    assert [x["completion"][0]["content"] for x in a] == ["The answer is 10.", "The answer is 11.",
                                                           "The answer is 12."]
    s = build_sft_examples(correct, _questions(), "step_by_step", "Think.", rationale_weight=0.5)
    assert [x["prompt"][0]["content"][:11] for x in s][:2] == ["[label] Que", "[rationale]"]
    assert [x["weight"] for x in s] == [1.0, 0.5, 1.0, 0.5]
    m = build_sft_examples(correct, _questions(), "rationale", "", short_ratio=1.0)  # all from the dataset
    assert len(m) == 3 and m[0]["completion"][0]["content"] == "Half of 2 is 1.\nThe answer is 10."
    assert reference_rationale("a <<1+1=2>>2\n#### 2", "2") == "a 2\nThe answer is 2."
    with pytest.raises(ConfigError, match="no correct rationale"):
        build_sft_examples(correct.select([]), _questions(), "rationale", "")
    with pytest.raises(ConfigError, match="cot.sft"):
        build_sft_examples(correct, _questions(), "cot", "")


def test_weighted_completion_loss_against_hand_computation():
    from kdkit.llm.cot_sft import completion_losses

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, requires_grad=True)
    labels = torch.tensor([[-100, 1, 2, -100], [-100, -100, 3, 4]])
    w = torch.tensor([1.0, 0.25])
    loss, parts = completion_losses(logits, labels, w)
    lp = torch.log_softmax(logits.detach(), -1)
    ce = [[-lp[0, 0, 1], -lp[0, 1, 2]], [-lp[1, 1, 3], -lp[1, 2, 4]]]
    expect = (1.0 * sum(ce[0]) + 0.25 * sum(ce[1])) / 4
    assert loss.item() == pytest.approx(expect.item(), rel=1e-6)
    assert parts["ce"].item() == pytest.approx((sum(ce[0]) + sum(ce[1])).item() / 4, rel=1e-6)
    t = torch.randn(2, 4, 5)
    with_kd, parts = completion_losses(logits, labels, w, t, kd_weight=2.0)
    assert with_kd.item() == pytest.approx(loss.item() + 2.0 * parts["kd"].item(), rel=1e-6)
    with_kd.backward()
    assert logits.grad[:, -1].abs().sum() == 0  # the last position predicts nothing


def test_redi_loss_and_pairs():
    from kdkit.llm.redi import build_pairs, redi_loss

    pos, neg = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    assert redi_loss(pos, neg, 0.8).item() == pytest.approx(((1 - 2.4) + (2 - 0.8)) / 2)
    with pytest.raises(ConfigError, match="alpha"):
        redi_loss(pos, neg, 1.5)
    correct = _rows([(0, "q0", "1", "", 0, "right", 1, "stop")])
    incorrect = _rows([(0, "q0", "1", "", 1, "wrong", 1, "stop"), (1, "q1", "2", "", 0, "wrong too", 1, "stop")])
    assert build_pairs(correct, incorrect) == [{"question_id": 0, "question": "q0", "positive": "right",
                                                "negative": "wrong", "positive_source": "teacher"}]
    # a question the teacher never got right pairs with the dataset's rationale, when one is given
    refs = {0: "ref 0", 1: "ref 1"}
    assert build_pairs(correct, incorrect, references=refs) == [
        {"question_id": 0, "question": "q0", "positive": "right", "negative": "wrong", "positive_source": "teacher"},
        {"question_id": 1, "question": "q1", "positive": "ref 1", "negative": "wrong too",
         "positive_source": "reference"}]


def test_redi_raises_correct_and_lowers_incorrect_traces(tiny_dir):
    from kdkit.llm.generation import chat_prompt
    from kdkit.llm.models import load_causal_lm
    from kdkit.llm.redi import _encode, _pad, mean_token_logprob, run_redi

    model, tok = load_causal_lm(tiny_dir)
    pairs = [{"question_id": i, "question": f"What is {i} + {i}?", "positive": f"{i} + {i} = {2 * i}. The answer "
              f"is {2 * i}.", "negative": f"{i} + {i} = {2 * i + 1}. The answer is {2 * i + 1}."} for i in range(6)]
    prompt = lambda q: chat_prompt(tok, q)  # noqa: E731

    def logps():
        with torch.no_grad():
            return [mean_token_logprob(model, *_pad([_encode(tok, prompt(p["question"]), p[k], 64) for p in pairs],
                                                    tok.pad_token_id)).mean().item() for k in ("positive", "negative")]

    pos0, neg0 = logps()
    stats = run_redi(model, tok, pairs, prompt, alpha=0.8, epochs=4, lr=3e-3, batch_size=3, max_length=64, seed=0,
                     progress=False)
    pos1, neg1 = logps()
    assert stats["steps"] == 8 and pos1 > pos0 and (pos1 - neg1) > (pos0 - neg0) + 0.1
    with pytest.raises(ConfigError, match="REDI needs"):
        run_redi(model, tok, [], prompt, alpha=0.8, epochs=1, lr=1e-3, batch_size=2, max_length=8, seed=0)


def test_redi_step_back_propagates_the_two_terms_apart_with_the_joint_losss_update(tiny_dir):
    """run_redi back-propagates the positive and negative terms one after the other (less memory): the update must
    be the one the joint loss gives, and the log-probs those of a full log-softmax."""
    import copy

    from kdkit.llm.generation import chat_prompt
    from kdkit.llm.models import load_causal_lm
    from kdkit.llm.redi import _encode, _pad, mean_token_logprob, redi_loss, run_redi

    model, tok = load_causal_lm(tiny_dir)
    pairs = [{"question": f"What is {i} + 1?", "positive": f"{i} + 1 = {i + 1}. The answer is {i + 1}.",
              "negative": f"The answer is {i + 7}."} for i in range(4)]
    prompt = lambda q: chat_prompt(tok, q)  # noqa: E731
    enc = {k: _pad([_encode(tok, prompt(p["question"]), p[k], 64) for p in pairs], tok.pad_token_id)
           for k in ("positive", "negative")}
    with torch.no_grad():
        ids, att, comp = enc["negative"]
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
        ref = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        mask = comp[:, 1:].float()
        expected = (ref * mask).sum(1) / mask.sum(1)
        assert torch.allclose(mean_token_logprob(model, ids, att, comp), expected, atol=1e-5)

    joint = copy.deepcopy(model)
    opt = torch.optim.AdamW(joint.parameters(), lr=1e-3, weight_decay=0.0)
    loss = redi_loss(mean_token_logprob(joint, *enc["positive"]), mean_token_logprob(joint, *enc["negative"]), 0.6)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(joint.parameters(), 1.0)
    opt.step()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match="alpha"):
        run_redi(model, tok, pairs, prompt, alpha=1.5, epochs=1, lr=1e-3, batch_size=4, max_length=64, seed=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused before any update
    stats = run_redi(model, tok, pairs, prompt, alpha=0.6, epochs=1, lr=1e-3, batch_size=4, max_length=64, seed=0,
                     progress=False)
    assert stats["steps"] == 1 and stats["history"][0]["loss"] == pytest.approx(loss.item(), abs=1e-5)
    for (name, a), b in zip(model.named_parameters(), joint.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_redi_saves_on_ctrl_c_and_resumes_bit_exactly(tiny_dir, tmp_path):
    from kdkit.checkpoint import load_checkpoint
    from kdkit.errors import CheckpointError
    from kdkit.llm.generation import chat_prompt
    from kdkit.llm.models import load_causal_lm
    from kdkit.llm.redi import run_redi

    tok = load_tokenizer(tiny_dir)
    pairs = [{"question": f"What is {i} + 2?", "positive": f"The answer is {i + 2}.",
              "negative": f"The answer is {i + 5}."} for i in range(5)]
    prompt = lambda q: chat_prompt(tok, q)  # noqa: E731
    kw = dict(alpha=0.8, epochs=2, lr=3e-3, batch_size=2, max_length=48, seed=0, progress=False)
    straight = load_causal_lm(tiny_dir)[0]
    full = run_redi(straight, tok, pairs, prompt, **kw)
    asked = []
    model = load_causal_lm(tiny_dir)[0]
    stopped = run_redi(model, tok, pairs, prompt, checkpoint_dir=tmp_path / "ckpt", **kw,
                       should_stop=lambda: asked.append(1) or len(asked) == 2)  # Ctrl-C during step 2
    assert stopped is None and load_checkpoint(tmp_path / "ckpt")["step"] == 2
    model = load_causal_lm(tiny_dir)[0]  # a new process starts again from the SFT weights
    resumed = run_redi(model, tok, pairs, prompt, checkpoint_dir=tmp_path / "ckpt", **kw)
    assert resumed["history"] == full["history"] and resumed["steps"] == 5
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), straight.state_dict().values()))
    with pytest.raises(CheckpointError, match="another run"):
        run_redi(model, tok, pairs[:3], prompt, checkpoint_dir=tmp_path / "ckpt", **kw)


class _CountingBackend:
    """A scripted teacher: answers right for even question ids; fails on call `fail_on` (a crash mid-stage)."""
    name = "scripted"

    def __init__(self, fail_on=None):
        self.calls, self.prompts, self.fail_on = 0, 0, fail_on

    def generate(self, prompts, spec):
        self.calls += 1
        if self.calls == self.fail_on:
            raise KeyboardInterrupt("simulated crash")
        self.prompts += len(prompts)
        return [[Completion(f"step {k}. The answer is {k}.", 6, "stop") for k in range(spec.n)] for _ in prompts]


def test_generation_resumes_at_the_first_missing_shard(tmp_path):
    from kdkit.llm.cot_generate import generate_rationales
    from kdkit.llm.generation import SamplingSpec

    tok = load_tokenizer(SMOL)
    qs = _questions(5)
    spec = SamplingSpec(n=2)
    first = _CountingBackend(fail_on=2)
    with pytest.raises(KeyboardInterrupt):
        generate_rationales(qs, tok, lambda: first, tmp_path, spec, "Think.", shard_size=2, progress=False)
    second = _CountingBackend()
    rows = generate_rationales(qs, tok, lambda: second, tmp_path, spec, "Think.", shard_size=2, progress=False)
    assert first.prompts == 2 and second.prompts == 3  # shard 0 was not redone
    assert len(rows) == 10 and list(rows["question_id"]) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    built = []
    again = generate_rationales(qs, tok, lambda: built.append(1), tmp_path, spec, "Think.", shard_size=2,
                                progress=False)
    assert not built and len(again) == 10  # everything done: no backend is even built
    # Ctrl-C: the stage stops after the shard it is writing; a rerun keeps the size the stage began with
    third = _CountingBackend()
    assert generate_rationales(qs, tok, lambda: third, tmp_path / "c", spec, "", shard_size=2, progress=False,
                               should_stop=lambda: True) is None and third.prompts == 2
    rows = generate_rationales(qs, tok, lambda: third, tmp_path / "c", spec, "", shard_size=3, progress=False)
    assert third.prompts == 5 and list(rows["question_id"]) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    with pytest.raises(ConfigError, match="final_answer"):
        generate_rationales(qs.remove_columns("final_answer"), tok, lambda: second, tmp_path / "b", spec, "")


def test_cot_pipeline_end_to_end_and_resume(tmp_path, tiny_dir, capsys, monkeypatch):
    """All five stages from the CLI on real GSM8K questions with the tiny model as teacher and a truncated copy as
    student, in the one run-folder layout; rerunning the same run name redoes nothing, refuses a changed training
    setting and redoes only an evaluation whose settings changed; Ctrl-C during SFT saves, exits 130, and the
    rerun finishes with the same model as an uninterrupted run."""
    args = ["distill", "recipe=cot-math-small", f"teacher.model={tiny_dir}", "student.model=truncated-teacher", "student.options={layers: 1}",
            "cot.train_questions=6", "cot.test_questions=4", "cot.samples=2", "cot.max_new_tokens=12",
            "cot.eval_max_new_tokens=12", "cot.shard_size=4", "cot.short_ratio=1.0", "cot.redi=false",
            "cot.sft_epochs=1", "data.batch_size=3", "trainer.progress=false", f"output_dir={tmp_path}",
            "name=run", "trainer.threads=1"]
    assert main(args) == 0
    run = tmp_path / "run"
    for part in ("generate/rationales", "filter/correct", "filter/incorrect", "sft/data", "sft/model",
                 "eval/teacher", "eval/student_before", "eval/student_sft", "report.md", "report.json"):
        assert (run / part).exists(), part
    report = json.loads((run / "report.json").read_text())
    assert report["filter"]["generated"] == 12 and report["test_questions"] == 4
    assert set(report["accuracy"]) == {"teacher", "student_before", "student_sft_rationale"}
    assert report["sft_stats"]["examples"] == 6 and report["sft_stats"]["steps"] == 2
    assert "Rationale distillation report" in (run / "report.md").read_text()
    seconds = report["stage_seconds"]
    assert set(seconds) == {"generate", "filter", "student", "sft", "eval_teacher", "eval_student_before",
                            "eval_student_sft"} and seconds["sft"] > 0
    # the one run-folder layout: each stage is a step of the shared loop, checkpointed with what it produced
    assert (run / "config.yaml").is_file() and (run / "train.log").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 4] and "sft_seconds" in rows[3] and "train_loss" in rows[3]
    assert rows[4]["accuracy/student_sft_rationale"] == report["accuracy"]["student_sft_rationale"]["accuracy"]
    from kdkit.checkpoint import latest_checkpoint, load_checkpoint

    state = load_checkpoint(latest_checkpoint(run))
    assert state["step"] == 4 and state["method"]["stages"] == ["generate", "filter", "student", "sft"]
    assert state["method"]["results"]["sft"]["stats"]["steps"] == 2
    assert json.loads((run / "metrics.json").read_text())["summary"].keys() == report["accuracy"].keys()
    stamp = (run / "sft" / "model" / "config.json").stat().st_mtime
    capsys.readouterr()
    assert main(args) == 0  # resume: every stage is done
    assert (run / "sft" / "model" / "config.json").stat().st_mtime == stamp
    again = json.loads((run / "report.json").read_text())["stage_seconds"]
    assert again["sft"] == seconds["sft"]  # a finished stage is not run (nor timed) again
    assert "Wall seconds per stage" in (run / "report.md").read_text()
    # a changed training setting is refused, naming it, before anything is written
    assert main([*args, "cot.sft_epochs=2", "optim.lr=0.001"]) == 2
    err = capsys.readouterr().err
    assert "cot.sft_epochs: 1.0 -> 2.0" in err and "optim.lr: 0.0001 -> 0.001" in err
    # an evaluation setting may change: only the evaluations are redone
    assert main([*args, "cot.test_questions=2"]) == 0
    assert json.loads((run / "report.json").read_text())["test_questions"] == 2
    assert json.loads((run / "eval" / "teacher.json").read_text())["questions"] == 2
    assert (run / "sft" / "model" / "config.json").stat().st_mtime == stamp
    # Ctrl-C during SFT: a TRL checkpoint at that step, one line, exit 130; the same command finishes the run
    import signal

    import kdkit.llm.cot_sft as cot_sft

    losses = cot_sft.completion_losses
    calls = []

    def interrupt_once(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return losses(*a, **kw)

    monkeypatch.setattr(cot_sft, "completion_losses", interrupt_once)
    again = [*args[:-2], "name=sigint", "trainer.threads=1", f"cot.generations={run}", "cot.eval_teacher=false",
             "cot.eval_student_before=false"]
    capsys.readouterr()
    assert main(again) == 130
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kdkit")]  # (and HF's bars)
    assert len(err) == 1 and err[0].startswith("kdkit: interrupted at step 3") and "resume=auto" in err[0]
    assert (tmp_path / "sigint" / "sft" / "checkpoints" / "checkpoint-1").is_dir()
    assert not (tmp_path / "sigint" / "sft" / "model").exists()
    assert main(again) == 0
    stats = json.loads((tmp_path / "sigint" / "report.json").read_text())["sft_stats"]
    assert stats["resumed_from"].endswith("checkpoint-1") and stats["steps"] == 2
    from safetensors.torch import load_file

    resumed = load_file(str(tmp_path / "sigint" / "sft" / "model" / "model.safetensors"))
    straight = load_file(str(run / "sft" / "model" / "model.safetensors"))
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)
    # bad input: a student without a chat template
    tok = load_tokenizer(tiny_dir)
    tok.chat_template = None
    bare = tmp_path / "bare"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(tiny_dir)).save_pretrained(str(bare))
    tok.save_pretrained(str(bare))
    assert main([*args[:-2], "name=bare", f"student.model={bare}", "student.options={}",
                 "cot.generations=" + str(run)]) == 2


def test_redi_pairs_a_weak_teachers_negatives_with_the_datasets_rationales(tmp_path, tiny_dir, capsys):
    """A teacher that never answers right leaves REDI without pairs: a clear error, unless
    cot.redi_reference_positives pairs each incorrect trace with GSM8K's own rationale of its question."""
    import datasets

    from kdkit.data.gsm8k import load_gsm8k
    from kdkit.llm.cot_generate import COLUMNS, save_dataset
    from kdkit.llm.cot_sft import reference_rationale

    train = load_gsm8k("train").select(range(3))
    rows = [(i, q, g, a, k, f"I guess. The answer is {int(float(g.replace(',', ''))) + 1 + k}.", 8, "stop")
            for i, (q, g, a) in enumerate(zip(train["question"], train["final_answer"], train["answer"]))
            for k in range(2)]
    save_dataset(datasets.Dataset.from_dict({c: [r[j] for r in rows] for j, c in enumerate(COLUMNS)}),
                 tmp_path / "gen" / "generate" / "rationales")
    args = ["distill", "recipe=cot-math-small", f"teacher.model={tiny_dir}", f"student.model={tiny_dir}",
            "student.options={}", "cot.train_questions=3", "cot.test_questions=2", "cot.eval_max_new_tokens=4",
            "cot.short_ratio=1.0", "cot.redi=true", "cot.sft_epochs=1", "data.batch_size=2",
            f"cot.generations={tmp_path / 'gen'}", "trainer.progress=false", f"output_dir={tmp_path}",
            "trainer.threads=1"]
    assert main([*args, "name=plain"]) == 2  # no correct teacher trace: REDI has no pairs, and says so
    assert "REDI needs" in capsys.readouterr().err
    # now the teacher gets question 0 right once, ending in its own words: that pair keeps the teacher's trace,
    # ended the way SFT trains ("The answer is N."); questions 1 and 2 fall back to GSM8K's rationales
    g0 = train[0]["final_answer"]
    rows[0] = (*rows[0][:5], f"Add them up.\nSo the answer is {g0} clips", *rows[0][6:])
    save_dataset(datasets.Dataset.from_dict({c: [r[j] for r in rows] for j, c in enumerate(COLUMNS)}),
                 tmp_path / "gen2" / "generate" / "rationales")
    assert main([*args, "name=ref", "cot.redi_reference_positives=true", f"cot.generations={tmp_path / 'gen2'}"]) == 0
    run = tmp_path / "ref"
    pairs = datasets.load_from_disk(str(run / "redi" / "pairs"))
    assert list(pairs["positive_source"]) == ["teacher"] + ["reference"] * 4
    assert pairs[0]["positive"] == f"Add them up.\nThe answer is {g0}." and pairs[0]["negative"] == rows[1][5]
    assert pairs[1]["positive"] == reference_rationale(train[1]["answer"], train[1]["final_answer"])
    assert pairs[2]["negative"] == rows[3][5]
    stats = json.loads((run / "redi" / "redi.json").read_text())
    assert stats["pairs"] == 5 and stats["reference_positives"] == 4 and stats["steps"] == 3
    assert "student_sft_redi" in json.loads((run / "report.json").read_text())["accuracy"]


def test_corrupt_text_data_is_refused_naming_the_file_and_line(tmp_path, tiny_dir, monkeypatch, capsys):
    """A GSM8K line without `answer` or not JSON, and bad rows of the LM text loaders: one line naming file and
    row, from the loaders and from `kdkit distill`."""
    import re

    from kdkit.data.gsm8k import load_gsm8k
    from kdkit.errors import DataFileError
    from kdkit.llm.text_data import load_texts

    gsm = tmp_path / "data" / "gsm8k"
    gsm.mkdir(parents=True)
    good = json.dumps({"question": "How many?", "answer": "2 + 2 = 4\n#### 4"}) + "\n"
    (gsm / "train.jsonl").write_text(good + "\n" + json.dumps({"question": "And now?"}) + "\n")
    (gsm / "test.jsonl").write_text(good + '{"question": "Broken", "answer": \n')
    monkeypatch.setenv("KDKIT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("KDKIT_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(DataFileError, match=re.escape(f"{gsm / 'train.jsonl'}, line 3: no 'answer' field")):
        load_gsm8k("train")
    with pytest.raises(DataFileError, match=re.escape(f"{gsm / 'test.jsonl'}, line 2: not valid JSON")):
        load_gsm8k("test")
    assert main(["distill", "recipe=cot-math-small", f"teacher.model={tiny_dir}", "cot.backend=transformers",
                 f"output_dir={tmp_path / 'runs'}", "name=bad", "trainer.progress=false"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kdkit")]
    assert err == [f"kdkit: error: {gsm / 'train.jsonl'}, line 3: no 'answer' field (each record needs 'question', "
                   "'answer')"]
    for name, text, message in (("a.jsonl", '{"body": "ok"}\n{"body": 3}\n', "line 2: 'body' is 3, not text"),
                                ("b.jsonl", '{"body": "ok"}\n{"body": "x"\n', "line 2: not valid JSON"),
                                ("c.csv", "body,id\nok,1\n,2\n", "row 2: 'body' is null, not text")):
        (tmp_path / name).write_text(text)
        with pytest.raises(DataFileError, match=re.escape(f"{tmp_path / name}, {message}")):
            load_texts(str(tmp_path / name), "train", text_field="body")
    (tmp_path / "d.txt").write_bytes(b"fine\n\xff\xfe\n")
    with pytest.raises(DataFileError, match=re.escape(f"{tmp_path / 'd.txt'}, line 2: not UTF-8 text")):
        load_texts(str(tmp_path / "d.txt"), "train")
