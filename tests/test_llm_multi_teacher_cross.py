"""Several LM teachers across tokenizers: in `teachers:`, a teacher whose tokenizer is not the student's trains
through the cross-tokenizer (ALM) path. Tiny random Llamas over two tokenizers trained here on GSM8K text (the
student and teachers.0: byte-level BPE, 512 tokens; teachers.1: Metaspace BPE, 700): routing sends each text to its
teacher and path, routed and mixed runs train with finite losses, a routed run resumes bit-exactly, all the weight on
the ALM teacher reproduces the single-teacher cross-tokenizer run, and what cannot run is refused in one line
before any model loads."""
import json
import math

import pytest
import torch

from kdkit.cli import main
from kdkit.config import load_recipe
from kdkit.llm.build import build_lm_distiller
from test_llm_distill import TAIL, TINY, metaspace_tokenizer_dir, tokenizer_dir  # noqa: F401  (the fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(TINY, num_hidden_layers=2)
ROUTE = ["llm.multi_teacher.mix=route", "llm.multi_teacher.route_by=source",
         "llm.multi_teacher.route_values=[fwd, rev]"]
BOTH = "losses={kd: {type: token_kd, weight: 0.5, divergence: fkl}, ct: {type: cross_tokenizer, weight: 30}}"


def _tiny_lm(out, tok_dir, seed):
    """A random 2-layer Llama over the tokenizer at `tok_dir`, saved as a model folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    cfg = {k: v for k, v in SMALL.items() if k != "model_type"}
    ids = {k: getattr(tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=len(tok), **cfg, **ids))
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir, metaspace_tokenizer_dir):  # noqa: F811
    """(data folder: GSM8K texts as source 'fwd' and others reversed as 'rev', alternating; teachers.0 with the
    student's tokenizer; teachers.1 with the other; the student's tokenizer)."""
    from kdkit.llm.text_data import load_texts

    root = tmp_path_factory.mktemp("cross_teachers")
    for split, n in (("train", 40), ("test", 8)):
        texts = load_texts("gsm8k", split, limit=2 * n)
        rows = [r for f, b in zip(texts[:n], texts[n:]) for r in ({"text": f, "source": "fwd"},
                                                                    {"text": b[::-1], "source": "rev"})]
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    same = _tiny_lm(root / "same", tokenizer_dir, 11)  # not the student's seed: not its copy
    other = _tiny_lm(root / "other", metaspace_tokenizer_dir, 12)
    return root, same, other, tokenizer_dir


def _args(setup, *extra, teachers=None, losses=BOTH):
    data, same, other, tok = setup
    teachers = teachers or [same, other]
    return [*TAIL, f"data.name={data}", "llm.text_field=text", "teacher.model=null", "student.model=scratch",
            f"student.options={json.dumps({'tokenizer': str(tok), 'config': SMALL})}", "llm.eval_examples=8",
            "teachers=[" + ", ".join(f"{{model: {t}}}" for t in teachers) + "]", "data.batch_size=4",
            "optim.lr=3e-3", "ce_weight=0.5", "scheduler.warmup_epochs=0", losses, *extra]


def _rows(setup, split="train"):
    return [json.loads(r) for r in (setup[0] / f"{split}.jsonl").read_text().splitlines()]


def test_route_sends_each_text_to_its_teacher_and_path(tmp_path, setup):
    """Texts routed to teachers.0 (the student's tokenizer) are packed into token blocks; those routed to
    teachers.1 (another tokenizer) stay whole for its aligner. Each step takes one path; the run reports each
    teacher's perplexity (teachers.1's over its own tokens), both terms finite."""
    from transformers import AutoTokenizer

    from kdkit.llm.text_data import pack_blocks

    d = build_lm_distiller(load_recipe("lm-scratch", _args(setup, *ROUTE, "llm.max_steps=8", f"output_dir={tmp_path}",
                                                            "name=routed")), "distill")
    rows = _rows(setup)
    ct = d.cross_teachers
    assert list(ct.batchers) == [1] and ct.texts == [r["text"] for r in rows if r["source"] == "rev"]
    assert bool((ct.owner == 1).all())
    fwd = pack_blocks([r["text"] for r in rows if r["source"] == "fwd"], AutoTokenizer.from_pretrained(str(setup[3])),
                      64)
    assert torch.equal(d.train_blocks, fwd) and bool((d.routes["train_routes"] == 0).all())
    plan = d.paths.epoch(0)
    assert d.steps_per_epoch == len(plan) == len(fwd) // 4 + len(ct.texts) // 4
    for path in (None, 1):  # each item at most once an epoch, from its own path
        items = torch.cat([i for k, i in plan if k == path])
        assert len(set(items.tolist())) == len(items) and int(items.max()) < (len(fwd) if path is None else 40)
    first = [k for k, _ in plan[:8]]
    assert None in first and 1 in first  # both paths among the steps run
    summary = d.fit()
    assert summary["blocks_per_teacher"] == [4 * first.count(None), 0]
    assert summary["texts_per_teacher"] == [0, 4 * first.count(1)]
    assert summary["cross_tokenizer_teachers"] == [1] and len(summary["teachers_ppl"]) == 2
    assert all(len(r) == 2 for r in summary["teachers_ppl_by_route"])
    last = d.state["history"][-1]
    assert all(math.isfinite(last[k]) for k in ("train_kd", "train_ct_teacher1", "train_ce", "train_loss"))
    assert "train_ct" not in last  # the ALM term is named by its teacher


def test_mean_mix_is_the_weighted_sum_of_token_kd_and_alm_on_the_same_texts(tmp_path, setup):
    """mix=mean, one teacher of each tokenizer: token KD against teachers.0 and ALM against teachers.1, each at
    half weight, on the same texts. On the first step (the same student and texts) each term is half what a fixed
    mixture with all the weight on its teacher gives; the teacher with no weight adds no term."""
    runs = {}
    for name, mix in (("mean", "mix=mean"), ("tok", "weights=[1, 0]"), ("alm", "weights=[0, 1]")):
        mix = [f"llm.multi_teacher.{mix}"] + ([] if name == "mean" else ["llm.multi_teacher.mix=fixed"])
        steps = 3 if name == "mean" else 1
        assert main(["distill", "recipe=lm-scratch", *_args(setup, *mix, f"llm.max_steps={steps}",
                                                            "llm.eval_every_steps=1", f"output_dir={tmp_path}",
                                                            f"name={name}")]) == 0
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    m = runs["mean"]
    for rec in m["history"]:
        assert rec["teacher_weights"] == [0.5, 0.5]
        assert all(math.isfinite(rec[k]) and rec[k] > 0 for k in ("train_kd", "train_ct_teacher1", "train_ce"))
    tok, alm = runs["tok"]["history"][0], runs["alm"]["history"][0]
    assert m["history"][0]["train_kd"] == pytest.approx(0.5 * tok["train_kd"], rel=1e-6)
    assert m["history"][0]["train_ct_teacher1"] == pytest.approx(0.5 * alm["train_ct_teacher1"], rel=1e-6)
    assert "train_ct_teacher1" not in tok and "train_kd" not in alm
    assert m["summary"]["steps"] == 3 and m["summary"]["cross_tokenizer_teachers"] == [1]


def test_all_weight_on_the_alm_teacher_is_the_single_teacher_cross_run(tmp_path, setup):
    """mix=fixed with weights [0, 1]: the same texts, student and loss, step for step, as `teacher.model=` the ALM
    teacher alone with losses.cross_tokenizer."""
    _, same, other, _ = setup
    args = _args(setup, "llm.max_steps=2", "llm.eval_every_steps=1", f"output_dir={tmp_path}",
                 losses="losses={ct: {type: cross_tokenizer, weight: 30}}")
    single = [a for a in args if not a.startswith("teachers=") and a != "teacher.model=null"]
    assert main(["distill", "recipe=lm-scratch", *single, f"teacher.model={other}", "name=single"]) == 0
    assert main(["distill", "recipe=lm-scratch", *args, "llm.multi_teacher.mix=fixed",
                 "llm.multi_teacher.weights=[0, 1]", "name=multi"]) == 0
    one, two = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("single", "multi"))
    assert one["summary"]["student_ppl_before"] == two["summary"]["student_ppl_before"]
    assert one["summary"]["teacher_ppl_own_tokens"] == pytest.approx(two["summary"]["teachers_ppl"][1], rel=1e-6)
    for a, b in zip(one["history"], two["history"], strict=True):
        assert a["train_ct"] == pytest.approx(b["train_ct_teacher1"], rel=1e-6)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6) and a["train_ce"] == b["train_ce"]
        assert "train_kd" not in b


def test_routed_run_across_tokenizers_resumes_bit_exactly(tmp_path, setup):
    args = _args(setup, *ROUTE, "llm.max_steps=6", "llm.eval_every_steps=3", "trainer.save_every_steps=2",
                 f"output_dir={tmp_path}")

    class Crash(Exception):
        pass

    def crash(method, step):
        if step == 5:
            raise Crash

    whole = build_lm_distiller(load_recipe("lm-scratch", [*args, "name=whole"]), "distill")
    whole.fit()
    with pytest.raises(Crash):
        build_lm_distiller(load_recipe("lm-scratch", [*args, "name=cut"]), "distill", on_step=crash).fit()
    resumed = build_lm_distiller(load_recipe("lm-scratch", [*args, "name=cut", "resume=auto"]), "distill")
    resumed.fit()
    a, b = whole.raw.state_dict(), resumed.raw.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    timeless = lambda h: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in h]  # noqa: E731
    assert timeless(whole.state["history"]) == timeless(resumed.state["history"])
    for key in ("blocks_per_teacher", "texts_per_teacher"):
        assert whole.state[key] == resumed.state[key]


KD, CT = "losses={kd: {type: token_kd}}", "losses={ct: {type: cross_tokenizer}}"


@pytest.mark.parametrize("extra, teachers, match", [
    ([KD], None, "teachers.1 tokenizes differently from the student (vocabulary sizes "
                                              "differ"),
    ([], "same,same", "every teacher shares the student's"),
    (["llm.multi_teacher.mix=learned"], None, "mix=learned trains weights through one mixed distribution"),
    (["teachers=[{model: SAME}, {model: OTHER, server: 'http://127.0.0.1:9'}]"], None, "teachers.1 is served"),
    (["losses.ct2={type: cross_tokenizer, weight: 1}"], None, "one cross_tokenizer loss serves every teacher"),
    ([], "other,other", "no teacher shares the student's tokenizer (teachers [0, 1] differ)"),
    ([*ROUTE, CT], None, "teachers.0 shares the student's tokenizer and "
                                                             "teaches through token KD: add a token_kd loss"),
])
def test_what_cannot_run_is_refused_in_one_line_before_any_model_loads(tmp_path, setup, monkeypatch, capsys, extra,
                                                                       teachers, match):
    import kdkit.llm.models as models

    _, same, other, _ = setup
    names = {"same": same, "other": other}
    chosen = [names[t] for t in teachers.split(",")] if teachers else None
    extra = [e.replace("SAME", str(same)).replace("OTHER", str(other)) for e in extra]
    losses = next((e for e in extra if e.startswith("losses=")), BOTH)
    extra = [e for e in extra if e != losses]
    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    rc = main(["distill", "recipe=lm-scratch", *_args(setup, *extra, teachers=chosen, losses=losses),
               f"output_dir={tmp_path / 'runs'}", "name=r"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("kdkit: error: ") and err.count("\n") == 1 and match in err, err
    assert not (tmp_path / "runs").exists()
