"""Tokenizer identity: a fingerprint to record beside stored teacher signals, and the same-tokenizer check."""
from __future__ import annotations

import hashlib
import json

from ..errors import TokenizerMismatchError


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the token -> id map and the special tokens: equal exactly when ids mean the same strings."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    blob = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def chat_template_sha256(tokenizer) -> str | None:
    """sha256 of the tokenizer's chat template (None without one): the fingerprint covers ids, not how a chat is
    laid out in them, and a signal stored over chat-formatted text only fits a student prompted the same way."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    blob = template if isinstance(template, str) else json.dumps(template, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def tokenizer_differences(teacher_tok, student_tok, sample: int = 0) -> list[str]:
    """Human-readable reasons why two tokenizers do not share token ids (empty list: they do)."""
    reasons = []
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if len(tv) != len(sv):
        reasons.append(f"vocabulary sizes differ: teacher {len(tv):,} tokens, student {len(sv):,}")
    differ = [tok for tok, i in tv.items() if sv.get(tok) != i]
    if differ:
        shown = ", ".join(repr(t) for t in sorted(differ, key=tv.get)[:5])
        reasons.append(f"{len(differ):,} teacher tokens have another id (or none) in the student's vocabulary, "
                       f"e.g. {shown}")
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        a, b = getattr(teacher_tok, name, None), getattr(student_tok, name, None)
        if a is not None and b is not None and (a != b or tv.get(a) != sv.get(b)):
            reasons.append(f"{name} differs: teacher {a!r} (id {tv.get(a)}), student {b!r} (id {sv.get(b)})")
    return reasons


def require_same_tokenizer(teacher_tok, student_tok, what: str = "token-level logit KD") -> None:
    """Refuse position-by-position logit KD between different tokenizers, saying why and what to use instead."""
    reasons = tokenizer_differences(teacher_tok, student_tok)
    if reasons:
        raise TokenizerMismatchError(
            f"{what} needs teacher and student to share one tokenizer, but " + "; ".join(reasons) +
            ". Use the cross-tokenizer loss (losses.cross_tokenizer, aligned-span likelihood matching) or a "
            "student with the teacher's tokenizer; `kdkit check teacher=... student=...` lists the differences.")


def train_byte_bpe(texts: list[str], out, vocab_size: int = 512) -> None:
    """A byte-level BPE trained on `texts`, saved at `out` as a transformers tokenizer (EOS = BOS = PAD =
    <|endoftext|>): a small vocabulary keeps the logit layer of CPU-sized experiments and tests cheap."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.save_pretrained(str(out))
