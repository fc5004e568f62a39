"""Teacher-signal store: a tiny random Llama teacher over real GSM8K tokens, stored dense / top-k / RS-KD sampled,
read back through `datasets`, checked against the live teacher, and used to train a student from disk."""
import json
import math
import shutil

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from kdkit.errors import CheckpointError, ConfigError, ShapeMismatchError, TokenizerMismatchError
from kdkit.llm.signal_store import (SignalSpec, open_signal_store, sample_sparse_targets, signal_kd_loss,
                                    write_signal_store)
from kdkit.llm.tokenizers import tokenizer_fingerprint
from kdkit.losses.token import token_kd_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

V, L, N_ROWS, BATCH, SHARD = 97, 32, 24, 5, 8
SPECS = {"dense": SignalSpec("dense"), "topk": SignalSpec("topk", k=8),
         "sampled": SignalSpec("sampled", samples=64, seed=3)}


def _gsm8k_lines(start, count):
    from kdkit.data.paths import data_dir

    with open(data_dir() / "gsm8k" / "train.jsonl") as f:
        rows = [json.loads(line) for _, line in zip(range(start + count), f)][start:]
    return [r["question"] + " " + r["answer"] for r in rows]


def _word_tokenizer(lines, vocab_size):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(lines, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=["[UNK]", "[EOS]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]", pad_token="[EOS]")


def _llama(layers, seed, head_scale=1.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)  # a sharper teacher than random init gives: KD has something to teach
    return model.eval()


class Teacher(nn.Module):
    """The Llama teacher behind a call counter that can fail on a given call (a crash mid-write)."""

    def __init__(self, inner, fail_on_call=None):
        super().__init__()
        self.inner, self.config, self.calls, self.fail_on_call = inner, inner.config, 0, fail_on_call

    def forward(self, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("simulated crash")
        return self.inner(**kwargs)


@pytest.fixture(scope="module")
def tok():
    return _word_tokenizer(_gsm8k_lines(0, 300), V)


@pytest.fixture(scope="module")
def blocks(tok):
    ids = [i for line in _gsm8k_lines(0, 300) for i in tok(line)["input_ids"] + [tok.eos_token_id]]
    assert len(ids) >= N_ROWS * L and len(tok) == V
    return torch.tensor(ids[:N_ROWS * L]).view(N_ROWS, L)


@pytest.fixture(scope="module")
def teacher():
    return Teacher(_llama(2, seed=0, head_scale=25.0))


@pytest.fixture(scope="module")
def reference(teacher, blocks):
    """The live teacher's log-probs [n, L-1, V] computed with the writer's batches (so fp32 results are identical)."""
    parts = []
    with torch.inference_mode():
        for a in range(0, N_ROWS, SHARD):
            for i in range(a, min(N_ROWS, a + SHARD), BATCH):
                j = min(a + SHARD, i + BATCH)
                parts.append(torch.log_softmax(teacher(input_ids=blocks[i:j]).logits[:, :-1].float(), -1))
    return torch.cat(parts)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, teacher, blocks, tok):
    root = tmp_path_factory.mktemp("stores")
    return {kind: write_signal_store(teacher, blocks, root / kind, spec, tok, batch_size=BATCH, shard_rows=SHARD,
                                     progress=False)
            for kind, spec in SPECS.items()}


def _pad(t, width):
    """Sampled signals are ragged: each batch pads to its widest position (weight 0); pad further with zeros."""
    return torch.nn.functional.pad(t, (0, width - t.shape[-1])) if t.ndim == 3 else t


def _cat(batches):
    keys = [k for k, v in batches[0].items() if torch.is_tensor(v)]
    width = max(b["logprobs"].shape[-1] for b in batches)
    return {k: torch.cat([_pad(b[k], width) for b in batches]) for k in keys}


def _all(store, batch_size=7):
    return _cat(list(store.batches(batch_size)))


# ------------------------------------------------------------------ round trip


def test_dense_store_reproduces_teacher_logprobs(stores, reference, blocks, tok):
    store = open_signal_store(stores["dense"], tok)
    got = _all(store)
    assert got["logprobs"].dtype == torch.float16 and got["logprobs"].shape == (N_ROWS, L - 1, V)
    assert torch.equal(got["logprobs"], reference.half())  # exactly the teacher's fp32 log-probs rounded to fp16
    assert torch.equal(got["row"], torch.arange(N_ROWS)) and torch.equal(got["input_ids"], blocks)
    assert torch.equal(got["labels"], blocks)
    m = store.meta
    assert (m["kind"], m["vocab_size"], m["n_rows"], m["block_size"]) == ("dense", V, N_ROWS, L)
    assert m["tokenizer_fingerprint"] == tokenizer_fingerprint(tok) and m["teacher"]["config_sha256"]
    assert m["kdkit_version"] and len(store) == N_ROWS and len(m["shards"]) == 3


def test_topk_store_keeps_exact_ids_and_values(stores, reference, tok):
    got = _all(open_signal_store(stores["topk"], tok))
    vals, ids = reference.topk(8, dim=-1)
    assert torch.equal(got["indices"], ids)
    assert torch.equal(got["logprobs"], vals.half())


def test_bfloat16_storage_and_padding_mask(teacher, blocks, reference, tok, tmp_path):
    mask = torch.ones(5, L, dtype=torch.long)
    mask[0, -4:] = 0  # right padding: those tokens are not counted
    path = write_signal_store(teacher, blocks[:5], tmp_path / "bf16", SignalSpec("dense", dtype="bfloat16"), tok,
                              attention_mask=mask, batch_size=BATCH, progress=False)
    got = next(open_signal_store(path, tok).batches(5))
    assert got["logprobs"].dtype == torch.bfloat16
    assert (got["labels"] == -100).sum() == 4 and (got["labels"][0, -4:] == -100).all()
    # positions that see no padding are unchanged by the mask: the bf16 rounding of the live teacher (2^-9 relative)
    want, have = reference[:5, :-4], got["logprobs"][:, :-4].float()
    assert ((have - want).abs() <= want.abs() * 2**-8 + 1e-4).all()
    assert torch.equal(got["logprobs"][1:], reference[1:5].bfloat16())


def test_sampled_store_holds_rs_kd_draws(stores, reference, tok):
    got = _all(open_signal_store(stores["sampled"], tok))
    w, idx, counts = got["weights"], got["indices"], got["counts"].long()
    n = SPECS["sampled"].samples
    assert torch.equal(counts.sum(-1), torch.full((N_ROWS, L - 1), n))           # N draws per position
    assert torch.allclose(w.sum(-1), torch.ones(N_ROWS, L - 1))                  # q = p: w = counts / N
    drawn = counts > 0
    assert torch.equal(got["logprobs"][drawn], reference.gather(-1, idx)[drawn].half())
    # distinct ids within a position (no double counting)
    assert all(len(set(row[m].tolist())) == int(m.sum()) for row, m in zip(idx.flatten(0, 1), drawn.flatten(0, 1)))


@pytest.mark.parametrize("kind", list(SPECS))
def test_streaming_and_memory_mapped_agree(stores, tok, blocks, kind, tmp_path):
    stream = open_signal_store(stores[kind], tok, streaming=True)
    mapped = open_signal_store(stores[kind], tok, streaming=False, cache_dir=tmp_path)
    a, b = list(stream.batches(5)), list(mapped.batches(5))
    assert [len(x["row"]) for x in a] == [5, 5, 5, 5, 4]
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k]
    whole = _cat(a)
    pick = mapped.rows([17, 2, 9])  # the trainer's random access
    width = whole["logprobs"].shape[-1]
    for k, v in pick.items():
        if torch.is_tensor(v):
            assert torch.equal(_pad(v, width), whole[k][[17, 2, 9]])
    assert torch.equal(mapped.blocks(), blocks)
    first = next(iter(stream))
    assert torch.equal(first["input_ids"], blocks[0]) and first["kind"] == kind
    shuffled = torch.cat([x["row"] for x in stream.batches(6, shuffle_buffer=10, seed=1)])
    assert sorted(shuffled.tolist()) == list(range(N_ROWS)) and shuffled.tolist() != list(range(N_ROWS))


def test_shards_are_zstd_parquet_and_smaller_than_fp32(stores):
    raw_fp32 = N_ROWS * (L - 1) * V * 4
    sizes = {}
    for kind, path in stores.items():
        meta = json.loads((path / "signal_store.json").read_text())
        for shard in meta["shards"]:
            f = path / shard["file"]
            assert f.read_bytes()[-4:] == b"PAR1"
            md = pq.ParquetFile(f).metadata
            codecs = {md.row_group(g).column(c).compression for g in range(md.num_row_groups)
                      for c in range(md.num_columns)}
            assert codecs == {"ZSTD"}
        sizes[kind] = sum(f.stat().st_size for f in path.glob("*.parquet"))
        assert sizes[kind] == meta["bytes"]
    assert sizes["dense"] < 0.5 * raw_fp32          # fp16 + zstd: less than half of raw fp32 log-probs
    assert sizes["topk"] < sizes["dense"] / 3 and sizes["sampled"] < sizes["dense"] / 2


# ------------------------------------------------------------------ RS-KD estimator


def _row_distribution(seed=0, vocab=50):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, generator=g) * 2.0
    return torch.log_softmax(logits, -1)


def _dense_targets(idx, cnt, ratio, samples, vocab):
    w = cnt.float() / samples * ratio
    return torch.zeros(*idx.shape[:-1], vocab).scatter_add_(-1, idx, w)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_sampled_targets_are_unbiased(tau):
    logp = _row_distribution()
    p = logp.exp()
    q = torch.softmax(logp / tau, -1)
    draws, n = 4000, 16
    idx, cnt, ratio = sample_sparse_targets(logp.expand(draws, -1), n, generator=torch.Generator().manual_seed(7),
                                            proposal_temperature=tau)
    targets = _dense_targets(idx, cnt, ratio, n, 50)
    # each target is (Binomial(n, q_i) / n) * p_i / q_i: its mean over `draws` has this standard deviation
    sd = (p / q) * torch.sqrt(q * (1 - q) / (n * draws))
    err = (targets.mean(0) - p).abs()
    assert (err <= 5 * sd + 1e-7).all(), (err / sd).max()
    if tau == 1.0:
        assert torch.allclose(targets.sum(-1), torch.ones(draws))
    # the same bound rejects top-k targets (renormalised top 8): they are biased, not noisy
    top = torch.zeros(50).scatter_(0, p.topk(8).indices, p.topk(8).values)
    assert ((top / top.sum() - p).abs() > 5 * sd).any()


def test_sampled_loss_gradient_averages_to_forward_kl_gradient():
    logp = _row_distribution(seed=1)
    p = logp.exp()
    student = torch.randn(50, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    draws, n = 4000, 16
    idx, cnt, ratio = sample_sparse_targets(logp.expand(draws, -1), n, generator=torch.Generator().manual_seed(3))
    batch = {"kind": "sampled", "temperature": 1.0, "vocab_size": 50, "indices": idx[None],
             "counts": cnt[None], "ratios": ratio[None], "samples": n,
             "logprobs": logp.gather(0, idx.flatten()).view_as(idx)[None]}
    # every position sees the same student logits: d(mean over draws)/d(student) is the mean per-draw gradient
    est = signal_kd_loss(student.expand(1, draws, 50), batch)
    (g_est,) = torch.autograd.grad(est, student)
    dense = token_kd_loss(student[None, None], logp[None, None])
    (g_dense,) = torch.autograd.grad(dense, student)
    assert torch.allclose(g_dense, torch.softmax(student, -1) - p, atol=1e-6)
    # with q = p the gradient error is p - mean(w): the binomial bound again
    sd = torch.sqrt(p * (1 - p) / (n * draws))
    assert ((g_est - g_dense).abs() <= 5 * sd + 1e-6).all()
    # the loss itself is an unbiased estimate of KL(p || s), not just of the cross-entropy
    per_draw = torch.stack([signal_kd_loss(student.detach()[None, None], {**batch, **{k: batch[k][:, d:d + 1]
                                                                         for k in ("indices", "counts", "ratios", "logprobs")}})
                            for d in range(200)])
    assert abs(est.item() - dense.item()) < 5 * float(per_draw.std()) / math.sqrt(draws)


# ------------------------------------------------------------------ losses against the live teacher


def test_losses_match_the_live_teacher(stores, teacher, blocks, tok):
    student = torch.randn(4, L, V, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        live = teacher(input_ids=blocks[:4]).logits
    dense = next(open_signal_store(stores["dense"], tok).batches(4))
    labels = blocks[:4].clone()
    labels[:, :10] = -100
    dense["labels"] = labels
    for T, div in [(1.0, "fkl"), (2.0, "fkl"), (1.0, "rkl"), (1.5, "jsd")]:  # dense re-tempers exactly
        want = token_kd_loss(student[:, :-1], live[:, :-1], labels[:, 1:], divergence=div, T=T)
        assert float(signal_kd_loss(student, dense, divergence=div, T=T)) == pytest.approx(float(want), rel=2e-3)
    assert float(signal_kd_loss(student[:, :-1], dense)) == float(signal_kd_loss(student, dense))  # pre-shifted
    top = next(open_signal_store(stores["topk"], tok).batches(4))
    kl = float(token_kd_loss(student[:, :-1], live[:, :-1]))
    densified = float(signal_kd_loss(student, top))
    support = float(signal_kd_loss(student, top, topk_mode="support"))
    assert abs(densified - kl) < 0.25 * kl and support < kl  # the support alone drops the tail's share
    with pytest.raises(ConfigError, match="temperature 1.0"):
        signal_kd_loss(student, top, T=2.0)
    sampled = next(open_signal_store(stores["sampled"], tok).batches(4))
    assert abs(float(signal_kd_loss(student, sampled)) - kl) < 0.1 * kl
    with pytest.raises(ConfigError, match="T=1.0"):
        signal_kd_loss(student, sampled, T=2.0)
    with pytest.raises(ConfigError, match="forward KL only"):
        signal_kd_loss(student, sampled, divergence="rkl")


# ------------------------------------------------------------------ training from disk


def _true_kd(student, blocks, reference):
    with torch.no_grad():
        s = student(input_ids=blocks).logits[:, :-1]
    return float(token_kd_loss(s, reference))


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_training_from_the_store_lowers_kd_loss(stores, tok, blocks, reference, kind, tmp_path):
    student = _llama(1, seed=11).train()
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    store = open_signal_store(stores[kind], tok, streaming=True)
    before = _true_kd(student, blocks, reference)
    for epoch in range(4):
        for batch in store.batches(8, shuffle_buffer=8, seed=epoch):
            loss = signal_kd_loss(student(input_ids=batch["input_ids"]).logits, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = _true_kd(student, blocks, reference)
    assert after < 0.5 * before, (before, after)


# ------------------------------------------------------------------ refusals, damage, resume


def test_other_tokenizer_is_refused(stores, tok):
    other = _word_tokenizer(_gsm8k_lines(1000, 300), V)
    with pytest.raises(TokenizerMismatchError) as e:
        open_signal_store(stores["topk"], other)
    msg = str(e.value)
    assert tokenizer_fingerprint(tok) in msg and tokenizer_fingerprint(other) in msg
    assert open_signal_store(stores["topk"], tok).kind == "topk"


def test_missing_or_damaged_files_name_the_file(stores, tok, tmp_path):
    def copy(name):
        return shutil.copytree(stores["topk"], tmp_path / name)

    shard = "shard-00001-of-00003.parquet"
    d = copy("missing")
    (d / shard).unlink()
    with pytest.raises(CheckpointError, match=shard):
        open_signal_store(d, tok)
    d = copy("truncated")
    data = (d / shard).read_bytes()
    (d / shard).write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=shard):
        open_signal_store(d, tok)
    d = copy("footer")
    (d / shard).write_bytes(data[:-12] + b"\x00" * 12)  # same size, garbled footer
    with pytest.raises(CheckpointError, match=shard):
        open_signal_store(d, tok)
    d = copy("flipped")
    mid = len(data) // 2
    (d / shard).write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 64]) + data[mid + 64:])
    # sizes and footers are intact: only the checksum can tell, and it is checked by default
    with pytest.raises(CheckpointError, match=f"{shard} fails its SHA-256 check"):
        open_signal_store(d, tok)
    assert open_signal_store(d, tok, verify=False).kind == "topk"  # the opt-out sees nothing wrong
    d = copy("nometa")
    (d / "signal_store.json").unlink()
    with pytest.raises(CheckpointError, match="signal_store.json"):
        open_signal_store(d, tok)


def test_resumed_write_skips_finished_shards_and_equals_a_clean_write(teacher, blocks, tok, tmp_path, capsys):
    spec = SignalSpec("sampled", samples=16, seed=5)
    kw = {"batch_size": 4, "shard_rows": SHARD, "progress": False}
    crashing = Teacher(teacher.inner, fail_on_call=4)  # shard 0 = calls 1-2, crash in shard 1's second batch
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_signal_store(crashing, blocks, tmp_path / "store", spec, tok, **kw)
    partial = tmp_path / ".store.partial"
    assert sorted(p.name for p in partial.glob("*.parquet")) == ["shard-00000-of-00003.parquet"]
    with pytest.raises(CheckpointError, match="unfinished write"):
        open_signal_store(tmp_path / "store", tok)
    capsys.readouterr()
    resumed = Teacher(teacher.inner)
    out = write_signal_store(resumed, blocks, tmp_path / "store", spec, tok, **kw)
    assert resumed.calls == 4 and not partial.exists()  # shards 1 and 2 only
    # what the rest of the write will cost, said early (kdkit/budget.py): the batches of the shards still to write
    assert "estimate: 4 teacher batches of 4 blocks (2 of 3 shards to write), about " in capsys.readouterr().out
    clean = Teacher(teacher.inner)
    ref = write_signal_store(clean, blocks, tmp_path / "clean", spec, tok, **kw)
    assert clean.calls == 6
    a, b = (json.loads((p / "signal_store.json").read_text()) for p in (out, ref))
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]  # per-row seeds: same draws
    again = Teacher(teacher.inner)
    assert write_signal_store(again, blocks, tmp_path / "store", spec, tok, **kw) == out and again.calls == 0
    with pytest.raises(ConfigError, match="different teacher-signal store"):
        write_signal_store(again, blocks, tmp_path / "store", SignalSpec("topk", k=4), tok, **kw)


def test_bad_arguments_are_refused(teacher, blocks, tok, tmp_path):
    with pytest.raises(ConfigError, match="signal kind"):
        SignalSpec("logits")
    with pytest.raises(ConfigError, match="exceeds the vocabulary"):
        write_signal_store(teacher, blocks, tmp_path / "a", SignalSpec("topk", k=V + 1), tok, progress=False)
    with pytest.raises(ConfigError, match="tokenizer"):
        write_signal_store(teacher, blocks, tmp_path / "b", SignalSpec("topk"), None, progress=False)
    bad = blocks.clone()
    bad[0, 0] = V
    with pytest.raises(ShapeMismatchError, match="outside the teacher's vocabulary"):
        write_signal_store(teacher, bad, tmp_path / "c", SignalSpec("topk", k=4), tok, progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()
