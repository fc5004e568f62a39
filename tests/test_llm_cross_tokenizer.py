"""Cross-tokenizer KD (ALM, Minixhofer et al. 2025): chunk alignment between two real, different tokenizers trained
here on GSM8K text (byte-level BPE "Ġ" with 300 tokens vs Metaspace BPE "▁" with 500 and byte fallback), the
binarised chunk-likelihood loss against hand computations, the refusal of token-level KD across tokenizers, and
a tiny end-to-end distillation of a student with one tokenizer from a teacher with the other."""
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import pytest
import torch

from kdkit.config import PositiveFloat, loss_params, show, validate_losses
from kdkit.data.paths import data_dir
from kdkit.errors import ConfigError, ShapeMismatchError, TokenizerMismatchError
from kdkit.llm.cross_tokenizer import AlignedChunk, CrossTokenizerBatcher, align_tokenizations
from kdkit.losses.cross_tokenizer import CrossTokenizerLoss, alm_loss, chunk_logprobs
from kdkit.llm.tokenizers import require_same_tokenizer
from kdkit.models.outputs import Outputs
from kdkit.registry import LOSSES

REPO = Path(__file__).resolve().parents[1]


def _gsm8k(split: str, limit: int) -> list[str]:
    path = data_dir() / "gsm8k" / f"{split}.jsonl"
    if not path.is_file():
        pytest.skip(f"GSM8K not found at {path}")
    rows = [json.loads(line) for line, _ in zip(path.open(encoding="utf-8"), range(limit))]
    return [r["question"] + "\n" + r["answer"] for r in rows]


@pytest.fixture(scope="module")
def texts():
    return _gsm8k("train", 1500), _gsm8k("test", 48)


@pytest.fixture(scope="module")
def toks(texts):
    """(teacher_tok, student_tok): byte-level BPE (300, EOS appended) and Metaspace BPE (500, <s> ... </s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    train = texts[0]
    a = Tokenizer(models.BPE())
    a.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    a.decoder = decoders.ByteLevel()
    a.train_from_iterator(train, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    a.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>",
                                                     special_tokens=[("<|endoftext|>", 0)])
    b = Tokenizer(models.BPE(byte_fallback=True))
    b.pre_tokenizer = pre_tokenizers.Metaspace()
    b.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback()])
    b.train_from_iterator(train, trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<s>", "</s>", "<pad>"] + [f"<0x{i:02X}>" for i in range(256)]))
    b.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)])
    ta = PreTrainedTokenizerFast(tokenizer_object=a, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tb = PreTrainedTokenizerFast(tokenizer_object=b, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    assert (len(ta.get_vocab()), len(tb.get_vocab())) == (300, 500)
    return ta, tb


# --- an independent decoder: the exact bytes each token stands for, from its vocabulary string


def _gpt2_bytes() -> dict[str, int]:
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for x in range(256):
        if x not in bs:
            bs.append(x)
            cs.append(256 + n)
            n += 1
    return {chr(c): x for x, c in zip(bs, cs)}


_G2B = _gpt2_bytes()


def _surface(token: str, byte_level: bool) -> bytes:
    if byte_level:
        return bytes(_G2B[ch] for ch in token)
    if token.startswith("<0x") and token.endswith(">") and len(token) == 6:
        return bytes([int(token[3:5], 16)])
    return token.replace("▁", " ").encode("utf-8")


def _full(tok, text):
    e = tok(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    return tok.convert_ids_to_tokens(e["input_ids"]), e["offset_mapping"], [bool(x) for x in e["special_tokens_mask"]]


def _chunk_bytes(tokens, idx, byte_level):
    return b"".join(_surface(tokens[k], byte_level) for k in idx)


# ---------------------------------------------------------------- alignment


def test_hand_checked_alignment():
    # "Hello world": teacher Hel|lo|Ġworld (+EOS), student <s>|▁Hello|▁wor|ld|</s>: chunks "Hello", " world", EOS.
    chunks = align_tokenizations(
        "Hello world", ["Hel", "lo", "Ġworld", "<|endoftext|>"], [(0, 3), (3, 5), (5, 11), (0, 0)],
        ["<s>", "▁Hello", "▁wor", "ld", "</s>"], [(0, 0), (0, 5), (5, 9), (9, 11), (0, 0)],
        teacher_special=[False, False, False, True], student_special=[True, False, False, False, True],
        teacher_byte_level=True)
    assert chunks == [AlignedChunk((0, 1), (1,), (0, 5)), AlignedChunk((2,), (2, 3), (5, 11)),
                      AlignedChunk((3,), (4,), (11, 11))]
    # Word chunks: boundaries only before whitespace, so "Hel|lo" vs "▁Hel|lo" is one chunk, not two.
    args = ("Hello world", ["Hel", "lo", "Ġworld"], [(0, 3), (3, 5), (5, 11)],
            ["▁Hel", "lo", "▁wor", "ld"], [(0, 3), (3, 5), (5, 9), (9, 11)])
    assert [c.span for c in align_tokenizations(*args)] == [(0, 3), (3, 5), (5, 11)]
    assert align_tokenizations(*args, chunks="space") == [AlignedChunk((0, 1), (0, 1), (0, 5)),
                                                          AlignedChunk((2,), (2, 3), (5, 11))]
    # "é" is two bytes: byte-level pieces Ã|© (same char offsets) split by byte, so they align with byte fallback
    # one byte each, and with a whole-character token as one chunk.
    pieces = ("é", ["Ã", "©"], [(0, 1), (0, 1)])
    assert align_tokenizations(*pieces, ["<0xC3>", "<0xA9>"], [(0, 1), (0, 1)], teacher_byte_level=True) == [
        AlignedChunk((0,), (0,), (0, 1)), AlignedChunk((1,), (1,), (1, 2))]
    assert align_tokenizations(*pieces, ["é"], [(0, 1)], teacher_byte_level=True) == [
        AlignedChunk((0, 1), (0,), (0, 2))]
    with pytest.raises(ConfigError, match="chunks"):
        align_tokenizations(*args, chunks="words")
    with pytest.raises(ShapeMismatchError, match="offsets"):
        align_tokenizations("ab", ["a", "b"], [(0, 1)], ["ab"], [(0, 2)])


@pytest.mark.parametrize("mode", ["unconstrained", "space"])
def test_chunks_cover_text_in_order_with_equal_bytes(toks, texts, mode):
    ta, tb = toks
    for text in texts[1] + ["  two  spaces\n\n\tcafé — naïve 😀 x"]:
        t_tok, t_off, t_sp = _full(ta, text)
        s_tok, s_off, s_sp = _full(tb, text)
        chunks = align_tokenizations(text, t_tok, t_off, s_tok, s_off, teacher_special=t_sp, student_special=s_sp,
                                     teacher_byte_level=True, chunks=mode)
        raw = text.encode("utf-8")
        *body, eos = chunks
        # Consecutive, covering the text from its first byte to its last, then one chunk for both EOS tokens.
        assert [c.span[0] for c in body] == [0] + [c.span[1] for c in body[:-1]] and body[-1].span[1] == len(raw)
        assert eos == AlignedChunk((len(t_tok) - 1,), (len(s_tok) - 1,), (len(raw), len(raw)))
        # Each side's chunks are contiguous runs covering every text token once, in order (BOS in none).
        assert [k for c in body for k in c.teacher] == list(range(len(t_tok) - 1))
        assert [k for c in body for k in c.student] == list(range(1, len(s_tok) - 1))
        for c in body:
            seg = raw[c.span[0]:c.span[1]]
            assert _chunk_bytes(t_tok, c.teacher, True) == seg
            s_bytes = _chunk_bytes(s_tok, c.student, False)
            # Metaspace writes a "▁" before the first word that is not in the text.
            assert s_bytes == seg or (c.span[0] == 0 and s_bytes == b" " + seg and not text.startswith(" "))
            if mode == "space":
                assert c.span[1] == len(raw) or raw[c.span[1]:c.span[1] + 1].isspace()
        if mode == "unconstrained":  # the tokenizers differ, yet agree on most boundaries
            assert len(body) > 0.5 * min(len(t_tok), len(s_tok))


def test_identical_tokenizers_give_one_chunk_per_token(toks, texts, one_thread):
    ta, _ = toks
    batch = CrossTokenizerBatcher(ta, ta, max_length=512)(texts[1][:8])
    t, s = batch["teacher"], batch["student"]
    assert torch.equal(t["input_ids"], s["input_ids"]) and torch.equal(t["chunk_ids"], s["chunk_ids"])
    for row in range(8):
        n = int(t["attention_mask"][row].sum())
        assert t["chunk_ids"][row, :n].tolist() == list(range(n))  # every token its own chunk, EOS included
        assert (t["chunk_ids"][row, n:] == -1).all() and batch["n_chunks"][row] == n
    # The same model on both sides then matches itself exactly, whatever the options.
    model = _tiny_llama(len(ta), 0).eval()
    with torch.no_grad():
        out = _outputs(model, t)
        for kind in ("binary_kl", "reverse_binary_kl", "abs"):
            assert CrossTokenizerLoss(divergence=kind, append_space=True)(out, out).item() == pytest.approx(0, abs=1e-7)
        assert CrossTokenizerLoss(divergence="binary_ce")(out, out).item() > 0


def test_smollm2_against_metaspace_decodes_equal(toks):
    """A real pretrained byte-level tokenizer (SmolLM2, 49k tokens) against the 500-token Metaspace one."""
    path = REPO / ".cache" / "models" / "smollm2-135m-instruct"
    if not (path / "tokenizer.json").is_file():
        pytest.skip("SmolLM2 tokenizer not in .cache/models")
    from transformers import PreTrainedTokenizerFast

    sm, (_, tb) = PreTrainedTokenizerFast.from_pretrained(str(path)), toks
    text = "Weng earns $12 an hour.  She worked 50 minutes:\n12/60 = $<<12/60=0.2>>0.2 per minute.\n#### 10"
    for mode in ("unconstrained", "space"):
        t_ids, s_ids, chunks = CrossTokenizerBatcher(sm, tb, 256, chunks=mode).align([text])[0]
        assert "".join(sm.decode([t_ids[k] for k in c.teacher]) for c in chunks) == text
        assert chunks[-1].span[1] == len(text) and all(c.span[0] < c.span[1] for c in chunks)  # SmolLM2: no EOS
        s_tok = tb.convert_ids_to_tokens(s_ids)
        for c in chunks:
            t_bytes = sm.decode([t_ids[k] for k in c.teacher]).encode()
            s_bytes = _chunk_bytes(s_tok, c.student, False)
            assert s_bytes == t_bytes or (c.span[0] == 0 and s_bytes == b" " + t_bytes)


def test_batcher_truncation_and_prompt_exclusion(toks, texts):
    ta, tb = toks
    sample = texts[1][:6]
    cut = CrossTokenizerBatcher(ta, tb, max_length=24, teacher_max_length=20)
    batch = cut(sample, loss_starts=[t.index("\n") + 1 for t in sample])
    full = CrossTokenizerBatcher(ta, tb, max_length=4096).align(sample)
    assert batch["teacher"]["input_ids"].shape == (6, 20) and batch["student"]["input_ids"].shape == (6, 24)
    for row, (text, (t_ids, s_ids, chunks)) in enumerate(zip(sample, full)):
        start = len(text[:text.index("\n") + 1].encode())
        kept = [c for c in chunks if c.span[0] >= start and max(c.teacher) < 20 and max(c.student) < 24]
        assert batch["n_chunks"][row] == len(kept)
        for who, n, ids, key in (("teacher", 20, t_ids, "teacher"), ("student", 24, s_ids, "student")):
            expect = [-1] * n
            for cid, c in enumerate(kept):
                for k in getattr(c, key):
                    expect[k] = cid
            assert batch[who]["chunk_ids"][row].tolist() == expect
            assert batch[who]["input_ids"][row].tolist() == ids[:n]
    assert batch["teacher"]["space_mask"].shape == (len(ta),) and batch["student"]["space_mask"][tb.bos_token_id]


# ---------------------------------------------------------------- loss


def _lsm(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - lse for x in row]


def _divergence(t, s, kind, T, eps=1e-6):
    if kind == "abs":
        return abs(t - s)
    a, c = t / T - eps, s / T - eps
    p, q = math.exp(a), math.exp(c)
    if kind == "binary_ce":
        return -(p * c + (1 - p) * math.log(1 - q))
    if kind == "binary_kl":
        return p * (a - c) + (1 - p) * (math.log(1 - p) - math.log(1 - q))
    return q * (c - a) + (1 - q) * (math.log(1 - q) - math.log(1 - p))


@pytest.mark.parametrize("kind", ["binary_kl", "binary_ce", "reverse_binary_kl", "abs"])
@pytest.mark.parametrize("append_space", [False, True])
def test_loss_matches_hand_computation(kind, append_space):
    g = torch.Generator().manual_seed(0)
    t_logits = torch.randn(1, 4, 3, generator=g, dtype=torch.float64) * 2
    s_logits = torch.randn(1, 3, 5, generator=g, dtype=torch.float64) * 2
    t_ids, t_cid = torch.tensor([[2, 0, 1, 2]]), torch.tensor([[-1, 0, 0, 1]])  # chunk 0: tokens 1-2, 1: token 3
    s_ids, s_cid = torch.tensor([[1, 4, 0]]), torch.tensor([[-1, 0, 1]])  # chunk 0: token 1, chunk 1: token 2
    t_space, s_space = torch.tensor([True, False, True]), torch.tensor([False, True, False])  # V' < V is fine
    tl = [_lsm(r) for r in t_logits[0].tolist()]
    sl = [_lsm(r) for r in s_logits[0].tolist()]
    t_lp = [tl[0][0] + tl[1][1], tl[2][2]]
    s_lp = [sl[0][4], sl[1][0]]
    if append_space:  # + log P(next token is in the space mask) after each chunk's last token
        t_lp = [t_lp[0] + math.log(math.exp(tl[2][0]) + math.exp(tl[2][2])),
                t_lp[1] + math.log(math.exp(tl[3][0]) + math.exp(tl[3][2]))]
        s_lp = [s_lp[0] + sl[1][1], s_lp[1] + sl[2][1]]
    want = sum(_divergence(t, s, kind, 2.0) for t, s in zip(t_lp, s_lp)) / 2
    masks = dict(student_space_mask=s_space, teacher_space_mask=t_space) if append_space else {}
    got = alm_loss(s_logits, t_logits, s_ids, t_ids, s_cid, t_cid, divergence=kind, T=2.0, **masks)
    assert got.item() == pytest.approx(want, rel=1e-9)
    # The module reads the same tensors from Outputs.
    mod = CrossTokenizerLoss(T=2.0, divergence=kind, append_space=append_space)
    feats = lambda ids, cid, sp: {"input_ids": ids, "chunk_ids": cid, "space_mask": sp}  # noqa: E731
    out = mod(Outputs(s_logits, feats(s_ids, s_cid, s_space)), Outputs(t_logits, feats(t_ids, t_cid, t_space)))
    assert out.item() == pytest.approx(want, rel=1e-9)


def _two_way(p: float) -> list[float]:
    """Logits over 2 tokens giving token 0 probability p."""
    return [math.log(p), math.log1p(-p)]


def test_loss_zero_when_chunk_likelihoods_agree_and_grad_only_to_student():
    # Teacher spells each chunk with two tokens (probs p1, p2), the student with one (prob p1 * p2).
    probs = [(0.9, 0.5), (0.3, 0.8)]
    # Position t predicts token t+1; the last position predicts nothing that is scored.
    t_logits = torch.tensor([[_two_way(p1), _two_way(p2), _two_way(0.5)] for p1, p2 in probs], dtype=torch.float64)
    s_logits = torch.tensor([[_two_way(p1 * p2), _two_way(0.5)] for p1, p2 in probs], dtype=torch.float64)
    t_ids, t_cid = torch.tensor([[1, 0, 0]] * 2), torch.tensor([[-1, 0, 0]] * 2)
    s_ids, s_cid = torch.tensor([[1, 0]] * 2), torch.tensor([[-1, 0]] * 2)
    t_logits.requires_grad_(True)
    s_logits.requires_grad_(True)
    lp, ok = chunk_logprobs(s_logits, s_ids, s_cid, 1)
    assert ok.all() and torch.allclose(lp[:, 0], torch.tensor([math.log(p1 * p2) for p1, p2 in probs],
                                                              dtype=torch.float64))
    for kind in ("binary_kl", "reverse_binary_kl", "abs"):
        assert alm_loss(s_logits, t_logits, s_ids, t_ids, s_cid, t_cid, divergence=kind).item() == pytest.approx(
            0.0, abs=1e-12)
    # binary_ce (tokenkit's default) equals the teacher's binary entropy there: same gradients, offset value.
    ce = alm_loss(s_logits, t_logits, s_ids, t_ids, s_cid, t_cid, divergence="binary_ce").item()
    ent = [-(x * math.log(x) + (1 - x) * math.log1p(-x)) for x in
           (math.exp(math.log(p1 * p2) / 100 - 1e-6) for p1, p2 in probs)]
    assert ce == pytest.approx(sum(ent) / 2, rel=1e-9)
    # Move the student off: positive loss, finite gradient on the student, none on the teacher.
    s_off = s_logits.detach().clone()
    s_off[:, 0, 0] -= 1.0  # position 0 predicts the student's chunk token
    s_off.requires_grad_(True)
    loss = alm_loss(s_off, t_logits, s_ids, t_ids, s_cid, t_cid)
    assert loss.item() > 0
    loss.backward()
    assert t_logits.grad is None
    assert torch.isfinite(s_off.grad).all() and s_off.grad.abs().sum() > 0
    assert (s_off.grad[:, 1] == 0).all()  # the last position predicts nothing in a chunk


def test_chunks_at_position_zero_or_one_sided_are_not_scored():
    logits = torch.randn(1, 3, 4, dtype=torch.float64)
    # chunk 0 holds the unpredicted first token, chunk 1 exists only on this side, chunk 2 is fine
    lp, ok = chunk_logprobs(logits, torch.tensor([[0, 1, 2]]), torch.tensor([[0, 0, 2]]), 3)
    assert ok.tolist() == [[False, False, True]]
    other = torch.randn(1, 2, 6, dtype=torch.float64)
    d = alm_loss(other, logits, torch.tensor([[3, 5]]), torch.tensor([[0, 1, 2]]), torch.tensor([[-1, 1]]),
                 torch.tensor([[0, 0, 2]]), reduction="none")
    assert d.shape == (1, 3) and (d == 0).all()  # no chunk scored on both sides
    assert alm_loss(other, logits, torch.tensor([[3, 5]]), torch.tensor([[0, 1, 2]]), torch.tensor([[-1, 1]]),
                    torch.tensor([[0, 0, 2]])).item() == 0.0


def test_loss_registered_and_validates():
    assert LOSSES.get("cross_tokenizer") is CrossTokenizerLoss
    assert loss_params(CrossTokenizerLoss) == {
        "T": PositiveFloat, "divergence": Literal["binary_kl", "binary_ce", "reverse_binary_kl", "abs"],
        "append_space": bool, "chunks": Literal["unconstrained", "space"]}
    with pytest.raises(ConfigError, match="binary_kl"):
        CrossTokenizerLoss(divergence="kl")
    with pytest.raises(ConfigError, match=r"T=0.0 is not allowed: expected a number > 0"):
        CrossTokenizerLoss(T=0.0)
    for option, value, allowed in (("T", 0, "a number > 0"), ("divergence", "kl", "one of 'binary_kl'"),
                                   ("chunks", "words", "one of 'unconstrained', 'space'")):
        with pytest.raises(ConfigError, match=re.escape(f"losses.ct.{option}={show(value)} is not allowed: "
                                                         f"expected {allowed}")):
            validate_losses({"ct": {"type": "cross_tokenizer", option: value}})  # the recipe check, before any work
    ids = {"input_ids": torch.zeros(1, 2, dtype=torch.long)}
    with pytest.raises(ConfigError, match=r"student.features\['chunk_ids'\]"):
        CrossTokenizerLoss()(Outputs(torch.zeros(1, 2, 3), ids), Outputs(torch.zeros(1, 2, 3), ids))
    with pytest.raises(ConfigError, match="teacher logits"):
        CrossTokenizerLoss()(Outputs(torch.zeros(1, 2, 3), ids), None)
    with pytest.raises(ConfigError, match="fast tokenizer"):
        CrossTokenizerBatcher(SimpleNamespace(is_fast=False), SimpleNamespace(is_fast=False), 8)
    with pytest.raises(ShapeMismatchError, match="unshifted"):
        ids = torch.zeros(1, 3, dtype=torch.long)
        alm_loss(torch.zeros(1, 2, 3), torch.zeros(1, 3, 3), ids, ids, ids, ids)


# ---------------------------------------------------------------- refusal


def test_token_level_kd_refused_between_the_two_tokenizers(toks, tmp_path):
    ta, tb = toks
    with pytest.raises(TokenizerMismatchError) as err:
        require_same_tokenizer(ta, tb)
    msg = str(err.value)
    assert "300" in msg and "500" in msg and "cross_tokenizer" in msg  # both vocabulary sizes, and the way out
    require_same_tokenizer(ta, ta)
    ta.save_pretrained(str(tmp_path))
    from transformers import PreTrainedTokenizerFast

    require_same_tokenizer(ta, PreTrainedTokenizerFast.from_pretrained(str(tmp_path)))  # by content, not identity


# ---------------------------------------------------------------- end to end


def _tiny_llama(vocab: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def _outputs(model, side):
    return Outputs(model(input_ids=side["input_ids"], attention_mask=side["attention_mask"]).logits, side)


def test_student_with_other_tokenizer_learns_teacher_chunk_likelihoods(toks, texts, one_thread):
    ta, tb = toks
    train, held = texts
    # Teacher: fit briefly on GSM8K text with its own tokenizer, so its chunk likelihoods are far from uniform.
    teacher = _tiny_llama(len(ta), 0)
    enc = ta(train[:800], truncation=True, max_length=64, padding="max_length", return_tensors="pt")
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    for step in range(100):
        rows = slice(16 * step % 800, 16 * step % 800 + 16)
        ids, mask = enc["input_ids"][rows], enc["attention_mask"][rows]
        loss = teacher(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.6 * math.log(len(ta))
    teacher.eval().requires_grad_(False).zero_grad(set_to_none=True)

    batcher = CrossTokenizerBatcher(ta, tb, max_length=64)
    held_batch = batcher(held)
    crit = CrossTokenizerLoss()
    student = _tiny_llama(len(tb), 1)

    def held_out():
        with torch.no_grad():
            s, t = _outputs(student, held_batch["student"]), _outputs(teacher, held_batch["teacher"])
            ids = lambda o: (o.logits, o.features["input_ids"], o.features["chunk_ids"])  # noqa: E731
            c = int(held_batch["n_chunks"].max())
            s_lp, s_ok = chunk_logprobs(*ids(s), c)
            t_lp, t_ok = chunk_logprobs(*ids(t), c)
            ok = s_ok & t_ok
            return crit(s, t).item(), (s_lp - t_lp)[ok].abs().mean().item(), int(ok.sum())

    before, gap_before, n_scored = held_out()
    assert n_scored > 20 * len(held)  # most of each held-out text is scored
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    for step in range(60):
        b = batcher(train[16 * step % 1200: 16 * step % 1200 + 16])
        with torch.no_grad():
            t_out = _outputs(teacher, b["teacher"])
        loss = crit(_outputs(student, b["student"]), t_out)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in teacher.parameters())
        opt.step()
    after, gap_after, _ = held_out()
    assert after < 0.25 * before
    assert gap_after < 0.4 * gap_before  # held-out chunk log-likelihoods moved toward the teacher's
