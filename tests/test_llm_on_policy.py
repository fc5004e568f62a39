"""On-policy / mixed distillation (GKD, Agarwal et al. 2024): kdkit's mixer, its loss against TRL's, a small
on-policy loop that must bring the student closer to the teacher, and TRL's DistillationTrainer end to end -- all with
tiny random Llamas and a BPE tokenizer trained here on GSM8K text (no downloads)."""
import json
import math
import os

import pytest
import torch

from kdkit.config import OnPolicyConfig
from kdkit.errors import ConfigError
from kdkit.llm.on_policy import IGNORE, OnPolicyMixer, gkd_loss
from kdkit.losses.token import token_kd_loss

GSM8K = os.path.join(os.environ["KDKIT_DATA_DIR"], "gsm8k")
CHAT = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|endoftext|>{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}")


def _records(split, n):
    with open(os.path.join(GSM8K, f"{split}.jsonl")) as f:
        return [json.loads(line) for line, _ in zip(f, range(n))]


@pytest.fixture(scope="module")
def tok():
    """A 384-token byte-level BPE trained on 400 GSM8K training texts; EOS = pad; a plain chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [r["question"] + "\n" + r["answer"] for r in _records("train", 400)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT
    return fast


def llama(tok, seed, init=0.02, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, initializer_range=init, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=None)
    return LlamaForCausalLM(cfg)


def blocks(tok, split, n, length, start=0):
    """n token blocks of `length` from GSM8K texts joined by EOS (as kdkit's LM data does)."""
    ids = []
    for r in _records(split, start + 4 * n)[start:]:
        ids += tok(r["question"] + "\n" + r["answer"])["input_ids"] + [tok.eos_token_id]
    assert len(ids) >= n * length
    return torch.tensor(ids[: n * length]).view(n, length)


def mixer(tok, seed=0, **kw):
    return OnPolicyMixer(OnPolicyConfig(**kw), tok.pad_token_id, tok.eos_token_id, seed=seed)


class NoGenerate(torch.nn.Module):
    def generate(self, *a, **k):
        raise AssertionError("fraction 0 must never generate")


# ------------------------------------------------------------------ the coin


def test_fraction_zero_never_one_always_half_reproducible(tok):
    never, always = mixer(tok, fraction=0.0), mixer(tok, fraction=1.0)
    assert not any(never.is_on_policy(s) for s in range(1000))
    assert all(always.is_on_policy(s) for s in range(1000))
    ids = blocks(tok, "train", 2, 24)
    out = never.maybe_generate(NoGenerate(), ids, None, step=3)
    assert out["on_policy"] is False and out["input_ids"] is ids and out["attention_mask"] is None
    assert torch.equal(out["labels"], ids)
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0  # right padding: pads are not learned from
    out = never.maybe_generate(NoGenerate(), ids, mask, step=3)
    assert (out["labels"][1, 20:] == IGNORE).all() and torch.equal(out["labels"][:, :20], ids[:, :20])

    half = [mixer(tok, seed=7, fraction=0.5).is_on_policy(s) for s in range(200)]
    assert 80 <= sum(half) <= 120
    assert half == [mixer(tok, seed=7, fraction=0.5).is_on_policy(s) for s in range(200)]  # a resumed run agrees
    assert half != [mixer(tok, seed=8, fraction=0.5).is_on_policy(s) for s in range(200)]
    # a fresh mixer asked about step 150 alone (resume mid-run) makes the same choice as the first run did
    assert all(mixer(tok, seed=7, fraction=0.5).is_on_policy(s) == half[s] for s in (0, 99, 150, 199))


def test_bad_settings_fail_early(tok):
    for kw in ({"fraction": 1.5}, {"prompt_tokens": 0}, {"max_new_tokens": 0}, {"temperature": -1.0},
               {"top_p": 0.0}):
        with pytest.raises(ConfigError):
            mixer(tok, **kw)


# ------------------------------------------------------------------ generated batches


def test_generated_batch_keeps_prompt_labels_completion_no_grad_restores_mode(tok):
    student = llama(tok, 0)
    ids = blocks(tok, "train", 3, 32)
    m = mixer(tok, fraction=1.0, prompt_tokens=10, max_new_tokens=8, temperature=1.0, top_p=0.9)
    for training in (True, False):
        student.train(training)
        out = m.maybe_generate(student, ids, None, step=5)
        assert student.training is training
    assert out["on_policy"] is True
    x, mask, y = out["input_ids"], out["attention_mask"], out["labels"]
    assert x.shape[0] == 3 and 10 < x.shape[1] <= 18 and x.shape == mask.shape == y.shape
    assert torch.equal(x[:, :10], ids[:, :10])  # the prompt, verbatim
    assert (y[:, :10] == IGNORE).all()
    gen = mask[:, 10:].bool()
    assert torch.equal(y[:, 10:][gen], x[:, 10:][gen]) and (y[:, 10:][~gen] == IGNORE).all()
    assert not x.requires_grad and all(p.grad is None for p in student.parameters())
    # the same step samples the same continuation (a resumed run regenerates the same batch) ...
    assert torch.equal(m.maybe_generate(student, ids, None, step=5)["input_ids"], x)
    # ... and the global RNG is not consumed by it
    torch.manual_seed(0)
    a = torch.rand(3)
    torch.manual_seed(0)
    m.maybe_generate(student, ids, None, step=6)
    assert torch.equal(torch.rand(3), a)


class Scripted(torch.nn.Module):
    """A 'student' whose generate appends fixed tokens, recording what it was given and in which state."""

    def __init__(self, new):
        super().__init__()
        self.lin = torch.nn.Linear(1, 1)
        self.new = new

    def generate(self, input_ids, attention_mask, **kw):
        self.seen = dict(ids=input_ids.clone(), mask=attention_mask.clone(), training=self.training,
                         grad=torch.is_grad_enabled(), kw=kw)
        return torch.cat([input_ids, self.new], 1)


def test_labels_stop_after_eos_and_ragged_prompts_are_left_padded(tok):
    eos = tok.eos_token_id
    m = mixer(tok, fraction=1.0, prompt_tokens=4, max_new_tokens=3, temperature=0.0)
    ids = torch.tensor([[11, 12, 13, 14, 15, 16], [0, 0, 21, 22, 23, 24], [31, 32, 33, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])  # left and right padded
    new = torch.tensor([[41, eos, eos], [51, 52, 53], [eos, eos, eos]])  # HF pads finished rows with pad (= eos)
    student = Scripted(new).train()
    out = m.maybe_generate(student, ids, mask, step=0)
    # the generator got left-padded prompts (the first 4 real tokens of each row), in eval mode, without grad
    assert student.seen["ids"].tolist() == [[11, 12, 13, 14], [21, 22, 23, 24], [eos, 31, 32, 33]]
    assert student.seen["mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]]
    assert student.seen["training"] is False and student.seen["grad"] is False and student.training is True
    assert student.seen["kw"]["do_sample"] is False and student.seen["kw"]["max_new_tokens"] == 3
    # returned right-padded: prompt, completion up to and including the first EOS, then pads (mask 0, -100)
    assert out["input_ids"].tolist() == [[11, 12, 13, 14, 41, eos, eos], [21, 22, 23, 24, 51, 52, 53],
                                         [31, 32, 33, eos, eos, eos, eos]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 0], [1] * 7, [1, 1, 1, 1, 0, 0, 0]]
    assert out["labels"].tolist() == [[IGNORE] * 4 + [41, eos, IGNORE], [IGNORE] * 4 + [51, 52, 53],
                                      [IGNORE] * 3 + [eos] + [IGNORE] * 3]


def test_padded_batch_generates_what_each_prompt_generates_alone(tok):
    student = llama(tok, 0).eval()
    ids = blocks(tok, "train", 3, 20)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding
    mask[2, 9:] = 0  # right padding: only 9 real tokens, shorter than the prompt
    m = mixer(tok, fraction=1.0, prompt_tokens=12, max_new_tokens=6, temperature=0.0)
    out = m.maybe_generate(student, ids, mask, step=0)
    for row in range(3):
        real = ids[row][mask[row].bool()][:12]
        alone = m.maybe_generate(student, real[None], None, step=0)
        n = int(out["attention_mask"][row].sum())
        assert torch.equal(out["input_ids"][row, :n], alone["input_ids"][0, : alone["attention_mask"][0].sum()])
        assert torch.equal(out["labels"][row, :n], alone["labels"][0, :n])
    # greedy decoding does not depend on the step's seed
    assert torch.equal(m.maybe_generate(student, ids, mask, step=1)["input_ids"], out["input_ids"])


# ------------------------------------------------------------------ the loss against TRL's


def test_gkd_loss_matches_trl_generalized_jsd():
    """kdkit's gkd_loss against the loss DistillationTrainer computes (TRL's chunked generalised JSD over hidden
    states and LM heads, reduced over the unmasked tokens) on the same logits = hidden @ head^T."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    g = torch.Generator().manual_seed(0)
    h_s, h_t = torch.randn(3, 7, 16, generator=g), torch.randn(3, 7, 24, generator=g)
    w_s, w_t = torch.randn(50, 16, generator=g) * 0.75, torch.randn(50, 24, generator=g) * 0.6
    s, t = h_s @ w_s.T, h_t @ w_t.T
    labels = torch.randint(0, 50, (3, 7), generator=g)
    labels[0, :4] = IGNORE
    labels[2, 5:] = IGNORE
    for beta in (0.0, 0.1, 0.3, 0.5, 0.9, 1.0):
        for T in (0.5, 1.0, 2.0):
            ref, _, n = _chunked_divergence_loss(h_s, h_t, w_s, w_t, labels != IGNORE, beta, temperature=T)
            ours = gkd_loss(s, t, labels, beta=beta, T=T)
            assert n.item() == (labels != IGNORE).sum().item()
            assert ours.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6), (beta, T)
            # kdkit's registered token loss is the same divergence with Hinton's T^2 gradient scale
            kd = token_kd_loss(s, t, labels, divergence="jsd", beta=beta, T=T)
            assert kd.item() == pytest.approx(T * T * ref.item(), rel=1e-5, abs=1e-6)
        # TRL's reduction: the mean over unmasked tokens; masked positions change nothing
        s2 = s.clone()
        s2[labels == IGNORE] = 100.0
        assert gkd_loss(s2, t, labels, beta=beta).item() == pytest.approx(gkd_loss(s, t, labels, beta=beta).item())
    assert gkd_loss(s, s, labels).item() == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------ a small on-policy loop


def _heldout_jsd(student, teacher, ids):
    with torch.no_grad():
        s, t = student(input_ids=ids).logits[:, :-1], teacher(input_ids=ids).logits[:, :-1]
    return gkd_loss(s, t, ids[:, 1:], beta=0.5).item()


def test_on_policy_distillation_brings_student_closer_to_teacher(tok):
    # a teacher that knows something about GSM8K text: a tiny Llama after a few CE steps on it
    teacher = llama(tok, 1)
    data = blocks(tok, "train", 32, 32, start=100)
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-2)
    for step in range(20):
        x = data[torch.arange(8 * step, 8 * step + 8) % len(data)]
        opt.zero_grad()
        teacher(input_ids=x, labels=x).loss.backward()
        opt.step()
    teacher.eval().requires_grad_(False)

    student = llama(tok, 0)
    train, heldout = blocks(tok, "train", 16, 24), blocks(tok, "test", 8, 40)
    m = mixer(tok, seed=0, fraction=0.5, prompt_tokens=12, max_new_tokens=12, temperature=1.0)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    before = _heldout_jsd(student, teacher, heldout)
    on = 0
    for step in range(16):
        rows = torch.arange(4 * step, 4 * step + 4) % len(train)
        batch = m.maybe_generate(student, train[rows], None, step)
        on += batch["on_policy"]
        x, mask, y = batch["input_ids"], batch["attention_mask"], batch["labels"]
        with torch.no_grad():
            t_logits = teacher(input_ids=x, attention_mask=mask).logits
        s_logits = student(input_ids=x, attention_mask=mask).logits
        loss = gkd_loss(s_logits[:, :-1], t_logits[:, :-1], y[:, 1:], beta=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _heldout_jsd(student, teacher, heldout)
    assert 0 < on < 16  # both kinds of batches were used
    assert math.isfinite(after) and after < 0.5 * before


# ------------------------------------------------------------------ TRL's DistillationTrainer


def test_trl_backend_rejects_what_its_trainer_cannot_do(tok, tmp_path, monkeypatch):
    from kdkit.llm import generation_vllm
    from kdkit.llm.trl_distill import train_with_trl, trl_beta

    assert trl_beta("fkl", 0.5) == 0.0 and trl_beta("rkl", 0.5) == 1.0 and trl_beta("jsd", 0.3) == 0.3
    cfg = OnPolicyConfig(fraction=0.5, backend="trl")
    for kw, words in (({"divergence": "skl"}, "backend: kdkit"), ({"divergence": "tvd"}, "backend: kdkit"),
                      ({"T": 2.0}, "temperature 1")):
        with pytest.raises(ConfigError, match=words):
            train_with_trl(None, None, tok, ["a b c"], None, cfg, output_dir=tmp_path, **kw)
    # vLLM generation: refused in one line without CUDA, and with CUDA but without the vllm package
    vllm = OnPolicyConfig(fraction=0.5, backend="trl", vllm=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="vllm=true generates with vLLM on a CUDA GPU") as e:
        train_with_trl(None, None, tok, ["a b c"], None, vllm, output_dir=tmp_path)
    assert "\n" not in str(e.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(generation_vllm, "vllm_available", lambda: False)
    with pytest.raises(ConfigError, match="needs the vllm package") as e:
        train_with_trl(None, None, tok, ["a b c"], None, vllm, output_dir=tmp_path)
    assert "\n" not in str(e.value)


def test_trl_vllm_recipe_keys_are_checked_before_any_work():
    from kdkit.config import load_recipe
    from kdkit.llm.build import check_recipe

    trl = ["llm.max_steps=2", "losses.kd.divergence=jsd", "llm.on_policy.backend=trl", "llm.on_policy.fraction=0.5"]
    for overrides, words in ((["llm.on_policy.vllm=true"], "backend=trl"),
                             ([*trl, "llm.on_policy.vllm=true", "llm.on_policy.fraction=0"], "fraction=0"),
                             ([*trl, "llm.on_policy.vllm=true", "trainer.cpu=true"], "CUDA GPU")):
        with pytest.raises(ConfigError, match=words) as e:
            check_recipe(load_recipe("smollm2-kd-small", overrides), "distill")
        assert "\n" not in str(e.value)
    check_recipe(load_recipe("smollm2-kd-small", trl), "distill")  # the same recipe without vLLM passes


def test_trl_vllm_settings_reach_distillation_config(tok, tmp_path):
    from transformers import AutoConfig

    from kdkit.llm.trl_distill import _loadable_by_vllm, distillation_args

    common = {"beta": 0.3, "lr": 1e-3, "max_steps": 2, "batch_size": 4, "max_length": 96, "output_dir": tmp_path,
              "seed": 0}
    args = distillation_args(OnPolicyConfig(fraction=1.0, max_new_tokens=8, temperature=0.0, backend="trl",
                                            vllm=True), **common)
    assert args.use_vllm and args.vllm_mode == "colocate" and args.vllm_max_model_length == 96 + 8
    assert args.generation_kwargs == {"temperature": 0.0}  # vLLM's greedy (SamplingParams has no do_sample)
    assert args.temperature == 1.0 and args.beta == 0.3 and args.max_completion_length == 8
    args = distillation_args(OnPolicyConfig(fraction=1.0, temperature=0.7, top_p=0.9), **common)
    assert not args.use_vllm and args.generation_kwargs == {"temperature": 0.7, "top_p": 0.9}
    # vLLM's engine is built from student.name_or_path: a student built in memory is saved there first
    student = llama(tok, 0, layers=1)
    student.name_or_path = "the-teacher"
    _loadable_by_vllm(student, tok, tmp_path)
    assert AutoConfig.from_pretrained(student.name_or_path).num_hidden_layers == 1


@pytest.mark.parametrize("divergence, beta", [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.3)])
def test_trl_loss_is_kdkit_divergence_over_the_generated_tokens(tok, tmp_path, divergence, beta):
    from kdkit.llm.trl_distill import build_trl_trainer, gsm8k_messages

    student, teacher = llama(tok, 0), llama(tok, 1, init=0.2)
    cfg = OnPolicyConfig(fraction=1.0, max_new_tokens=4)
    trainer = build_trl_trainer(student, teacher, tok, gsm8k_messages(_records("train", 4)), None, cfg,
                                divergence=divergence, beta=beta, max_steps=1, batch_size=4, max_length=96,
                                output_dir=tmp_path)
    student.train()
    batch = trainer._prepare_inputs([trainer.train_dataset[i] for i in range(4)])  # the student writes <= 4 tokens
    assert batch["completion_ids"].shape[1] <= 4
    # transformers passes a count of the dataset's tokens; whatever it passes, DistillationTrainer averages over
    # the tokens it scores, so kdkit needs no correction of the count (GKDTrainer needed one)
    loss = trainer.compute_loss(student, batch, num_items_in_batch=torch.tensor(1000.0))
    with torch.no_grad():
        x = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
        s = student(input_ids=x, attention_mask=mask).logits
        t = teacher(input_ids=x, attention_mask=mask).logits
    p = batch["prompt_ids"].shape[1]
    labels = batch["completion_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE)
    ref = token_kd_loss(s[:, p - 1:-1], t[:, p - 1:-1], labels, divergence=divergence, beta=beta)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_trl_distillation_trains_end_to_end(tok, tmp_path):
    from kdkit.llm.trl_distill import gsm8k_messages, gsm8k_pairs, train_with_trl

    student, teacher = llama(tok, 0), llama(tok, 1, init=0.2)
    generate, calls = student.generate, []

    def spy(*args, generation_config, **kwargs):  # records the sampling settings TRL really used
        calls.append(generation_config)
        return generate(*args, generation_config=generation_config, **kwargs)

    student.generate = spy
    w0 = student.model.embed_tokens.weight.detach().clone()
    cfg = OnPolicyConfig(fraction=0.5, max_new_tokens=8, temperature=0.9, top_p=0.95, backend="trl")
    train, heldout = _records("train", 16), _records("test", 4)
    metrics = train_with_trl(student, teacher, tok, gsm8k_messages(train), gsm8k_messages(heldout), cfg,
                             beta=0.5, lr=1e-3, max_steps=4, batch_size=4, max_length=96,
                             output_dir=tmp_path / "chat", seed=1)
    assert metrics["steps"] == 4
    for k in ("train_loss", "final_loss", "train_runtime", "eval_loss"):
        assert math.isfinite(metrics[k]) and metrics[k] >= 0, k
    assert 0 < metrics["eval_loss"] < math.log(2)  # the generalised JSD(0.5) is bounded by ln 2 per token
    assert not torch.equal(student.model.embed_tokens.weight, w0)
    # lambda = 0.5: the student generates exactly at the steps of kdkit's coin, and the evaluation generates nothing
    coin = mixer(tok, seed=1, fraction=0.5).is_on_policy
    assert 0 < len(calls) == sum(coin(step) for step in range(4)) < 4
    assert all(c.do_sample and c.temperature == 0.9 and c.top_p == 0.95 and c.max_new_tokens == 8 for c in calls)
    calls.clear()
    # plain (prompt, completion) pairs need no chat template; greedy, fully on-policy, reverse KL
    metrics = train_with_trl(student, teacher, tok, gsm8k_pairs(train[:8]), None,
                             OnPolicyConfig(fraction=1.0, max_new_tokens=4, temperature=0.0),
                             divergence="rkl", lr=1e-3, max_steps=2, batch_size=4, max_length=64,
                             output_dir=tmp_path / "pairs")
    assert metrics["steps"] == 2 and math.isfinite(metrics["final_loss"]) and "eval_loss" not in metrics
    assert len(calls) == 2 and not any(c.do_sample for c in calls)
