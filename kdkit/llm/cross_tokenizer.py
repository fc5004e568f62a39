"""Cross-tokenizer distillation by Approximate Likelihood Matching (ALM) over aligned text chunks.

Minixhofer, Vulić & Ponti 2025, "Cross-Tokenizer Distillation via Approximate Likelihood Matching"
(arXiv 2503.20083; reference code bminixhofer/tokenkit: `tokenkit/align.py`, `tokenkit/training/losses.py`,
`docs/pytorch_alm_from_scratch.ipynb`).

Token-level logit KD compares two next-token distributions position by position, so it needs one shared
vocabulary (`kdkit.llm.tokenizers.require_same_tokenizer` refuses it otherwise). ALM compares what both models
can score whatever their tokenizers: the likelihood of the same piece of text.

1. Alignment (`align_tokenizations`, `CrossTokenizerBatcher`): the text is cut at the byte positions where both
   tokenizations have a token boundary. Each chunk is a contiguous run of teacher tokens and one of student tokens
   that spell the same bytes. Tokens are placed by the fast tokenizers' character offsets, taken to UTF-8 bytes.
   Where offsets overlap they are refined by the token's own bytes (byte-level "Ġ" pieces or "<0xNN>" byte
   fallback inside one character each get their byte; the phantom "▁" Metaspace writes before the first word
   gets none); ends are made monotone, so whitespace conventions ("Ġ" vs "▁", trimmed offsets) only move where
   a token starts, never where a chunk ends. Special tokens with no text (BOS) are
   left out; trailing ones (EOS) on both sides form one last chunk ("the text ends here"). `chunks="space"` keeps
   only boundaries followed by whitespace (or the end), tokenkit's "space" alignments: word-level chunks, which
   carry less tokenization bias than the shortest chunks ("unconstrained", the default, as the notebook).
2. Chunk likelihood (`chunk_logprobs`): a model's log-likelihood of a chunk is the sum of the log-probs of its own
   next tokens inside the chunk (a token at position 0 has none, so a chunk holding one is left out). With
   `append_space`, tokenkit's `alm_mode=append_space`, the log-prob that the token after the chunk starts with
   whitespace (or is special) is added on each side: both then score "this text, then a word boundary".
3. Loss (`binarised_divergence`, `alm_loss`): per chunk, p = exp(teacher chunk logp), q = exp(student chunk logp),
   a divergence between Bernoulli(p^(1/T)) and Bernoulli(q^(1/T)), as tokenkit: log p^(1/T) = logp / T - 1e-6
   (the epsilon keeps it < 0), chunk logps clipped to <= 0, T = 100 (`bce_temp`), averaged over the chunks
   (`distill_main_path_numerator = denominator = chunk_count`). tokenkit's default `binary_ce` is the binary cross
   entropy -(p' log q' + (1-p') log(1-q')); our default `binary_kl` subtracts the teacher's binary entropy from it:
   the same gradient for the student, and exactly 0 when the chunk likelihoods agree. Values scale roughly as 1/T.

`CrossTokenizerLoss` (registered as loss ``cross_tokenizer``) reads, for each side (student and teacher `Outputs`):
  - ``logits``: [B, L, V], the model's logits over its own input ids, *not* shifted (position t predicts t+1);
  - ``features["input_ids"]``: [B, L] those ids;
  - ``features["chunk_ids"]``: [B, L] long, the chunk each token belongs to (-1: none; padding, BOS, excluded);
    the same id names the same text on both sides;
  - ``features["space_mask"]``: [V'] bool, only with ``append_space`` (tokens starting with whitespace or special).
`CrossTokenizerBatcher(teacher_tok, student_tok, max_length)(texts)` returns exactly these as
``batch["teacher"]`` / ``batch["student"]`` (plus ``attention_mask``), so a trainer does
``Outputs(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b)`` for each side.
Only the student gets gradients (the teacher's chunk log-likelihoods are detached).

Not included: tokenkit's "unbiased" chunks (they need tokenizer-pair bias matrices counted over a corpus),
`merge_by_space_prob`, chunk-size pooling and the hidden-state (latents) and side-path losses.
"""

import math
import re
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..errors import ConfigError, ShapeMismatchError
from ..models.outputs import Outputs
from ..registry import LOSSES
from ..losses.base import DistillLoss

__all__ = ["AlignedChunk", "align_tokenizations", "space_token_mask", "CrossTokenizerBatcher", "chunk_logprobs",
           "binarised_divergence", "alm_loss", "CrossTokenizerLoss", "CHUNK_MODES", "ALM_DIVERGENCES"]

CHUNK_MODES = ("unconstrained", "space")
ALM_DIVERGENCES = ("binary_kl", "binary_ce", "reverse_binary_kl", "abs")
_EPS = 1e-6  # tokenkit's epsilon: log p^(1/T) - eps < 0, so log(1 - p^(1/T)) stays finite
_WHITESPACE = frozenset(b" \t\n\r\x0b\x0c")
_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# Tokens starting with these stand for text starting with whitespace: GPT-2 byte-level space/newline/tab/CR,
# SentencePiece's "▁", and raw whitespace.
_SPACE_STARTS = frozenset("ĠĊĉč▁ \n\t\r")
_SPACE_BYTES = frozenset({"<0x20>", "<0x0A>", "<0x09>", "<0x0D>"})


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE's character -> byte map (the inverse of its `bytes_to_unicode`)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [x for x in range(256) if x not in keep]
    return {**{chr(x): x for x in keep}, **{chr(256 + n): x for n, x in enumerate(moved)}}


_BYTE_DECODER = _gpt2_byte_decoder()


# ---------------------------------------------------------------- alignment


@dataclass(frozen=True)
class AlignedChunk:
    """One aligned chunk: the teacher and student token positions that spell the UTF-8 bytes `span` of the text.

    A trailing-special chunk (both sides' EOS after the text) has the empty span (n, n), n the text's byte length.
    """

    teacher: tuple[int, ...]
    student: tuple[int, ...]
    span: tuple[int, int]


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and ("ByteLevel" in repr(backend.pre_tokenizer) or "ByteLevel" in repr(backend.decoder))


def _piece_bytes(token: str, byte_level: bool) -> bytes | None:
    """The bytes a token's vocabulary string stands for, or None when that is not known."""
    if _BYTE_FALLBACK.fullmatch(token):
        return bytes([int(token[3:5], 16)])
    if byte_level:
        return bytes(_BYTE_DECODER[ch] for ch in token) if all(ch in _BYTE_DECODER for ch in token) else None
    return token.replace("▁", " ").encode("utf-8")


def _token_ends(text: str, raw: bytes, offsets: Sequence[tuple[int, int]], tokens: Sequence[str],
                special: Sequence[bool], byte_level: bool) -> list[int | None]:
    """Byte position where each token's text ends (None for special tokens), monotone along the sequence.

    Character offsets are exact except where spans overlap: several byte pieces of one character share its span,
    and a "▁" Metaspace prepends (or "Ġ" from add_prefix_space) claims the first character although no text stands
    behind it. There the token is placed by its own bytes when they match the text (a leading space the text
    lacks is dropped), else it keeps its span's end (it is then grouped with its neighbours).
    """
    reach = min(len(text), max((e for _, e in offsets), default=0))
    c2b = [0]
    for ch in text[:reach]:
        c2b.append(c2b[-1] + len(ch.encode("utf-8")))
    spans = [(c2b[min(s, reach)], c2b[min(e, reach)]) for s, e in offsets]
    text_idx = [k for k in range(len(tokens)) if not special[k]]
    ends: list[int | None] = [None] * len(tokens)
    cursor = 0
    for m, k in enumerate(text_idx):
        start, end = spans[k]
        next_start = spans[text_idx[m + 1]][0] if m + 1 < len(text_idx) else end
        if start < cursor or next_start < end:
            piece, at = _piece_bytes(tokens[k], byte_level), max(start, cursor)
            if piece is not None and piece[:1] == b" " and raw[at:at + 1] != b" ":
                piece = piece[1:]
            if piece is not None and at + len(piece) <= end and raw[at:at + len(piece)] == piece:
                end = at + len(piece)
        cursor = ends[k] = max(end, cursor)
    return ends


def _boundaries(ends: Sequence[int | None]) -> dict[int, int]:
    """byte position -> index of the last token ending there, at every place a token boundary falls."""
    text_idx = [k for k, e in enumerate(ends) if e is not None]
    out = {}
    for m, k in enumerate(text_idx):
        nxt = ends[text_idx[m + 1]] if m + 1 < len(text_idx) else None
        if ends[k] > 0 and (nxt is None or nxt > ends[k]):
            out[ends[k]] = k
    return out


def align_tokenizations(text: str, teacher_tokens: Sequence[str], teacher_offsets: Sequence[tuple[int, int]],
                        student_tokens: Sequence[str], student_offsets: Sequence[tuple[int, int]], *,
                        teacher_special: Sequence[bool] | None = None, student_special: Sequence[bool] | None = None,
                        teacher_byte_level: bool = False, student_byte_level: bool = False,
                        chunks: str = "unconstrained") -> list[AlignedChunk]:
    """The aligned chunks of one text tokenized twice, in text order (see the module docstring for the rules).

    `*_offsets` are the fast tokenizers' character offsets, `*_special` their special-tokens masks (tokens added
    around the text, such as BOS/EOS; default: none). Tokens after the last shared boundary and special tokens
    other than the trailing ones belong to no chunk.
    """
    if chunks not in CHUNK_MODES:
        raise ConfigError(f"chunks must be one of {', '.join(CHUNK_MODES)}, got {chunks!r}")
    t_special = list(teacher_special) if teacher_special is not None else [False] * len(teacher_tokens)
    s_special = list(student_special) if student_special is not None else [False] * len(student_tokens)
    for who, toks, offs, spec in (("teacher", teacher_tokens, teacher_offsets, t_special),
                                  ("student", student_tokens, student_offsets, s_special)):
        if not len(toks) == len(offs) == len(spec):
            raise ShapeMismatchError(f"{who}: {len(toks)} tokens, {len(offs)} offsets and {len(spec)} special "
                                     "flags; give one of each per token")
    raw = text.encode("utf-8")
    t_ends = _token_ends(text, raw, teacher_offsets, teacher_tokens, t_special, teacher_byte_level)
    s_ends = _token_ends(text, raw, student_offsets, student_tokens, s_special, student_byte_level)
    t_bounds, s_bounds = _boundaries(t_ends), _boundaries(s_ends)
    shared = sorted(set(t_bounds) & set(s_bounds))
    if chunks == "space":
        shared = [c for c in shared if c == len(raw) or raw[c] in _WHITESPACE]
    out, t_from, s_from, prev = [], 0, 0, 0
    for c in shared:
        t_to, s_to = t_bounds[c] + 1, s_bounds[c] + 1
        out.append(AlignedChunk(tuple(k for k in range(t_from, t_to) if t_ends[k] is not None),
                                tuple(k for k in range(s_from, s_to) if s_ends[k] is not None), (prev, c)))
        t_from, s_from, prev = t_to, s_to, c
    # Trailing special tokens (EOS) on both sides, after text both sides cover to its end: "the text ends here".
    t_text = [k for k, e in enumerate(t_ends) if e is not None]
    s_text = [k for k, e in enumerate(s_ends) if e is not None]
    if t_text and s_text and shared and shared[-1] == len(raw):
        t_tail = tuple(range(t_text[-1] + 1, len(teacher_tokens)))
        s_tail = tuple(range(s_text[-1] + 1, len(student_tokens)))
        if t_tail and s_tail:
            out.append(AlignedChunk(t_tail, s_tail, (len(raw), len(raw))))
    return out


def space_token_mask(tokenizer) -> Tensor:
    """[len(tokenizer)] bool: tokens whose text starts with whitespace, and special tokens (for `append_space`).

    As tokenkit's `get_space_mask(mode="space+tab+newline+special")`, for "Ġ"/"Ċ"/"ĉ" byte-level tokens, "▁"
    SentencePiece tokens and "<0x20>"-style byte fallback.
    """
    n = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    mask = torch.tensor([bool(t) and (t[0] in _SPACE_STARTS or t in _SPACE_BYTES) for t in
                         (tok or "" for tok in tokens)], dtype=torch.bool)
    special = [i for i in tokenizer.all_special_ids if 0 <= i < n]
    mask[special] = True
    return mask


class CrossTokenizerBatcher:
    """Raw texts -> the teacher's and the student's tokenized batches plus their chunk alignment.

    ``batcher(texts)`` returns ``{"teacher": {...}, "student": {...}, "n_chunks": [B]}``; each side holds
    ``input_ids`` / ``attention_mask`` / ``chunk_ids`` ([B, L], right-padded, chunk id -1 on padding and on tokens
    in no chunk) and ``space_mask`` ([V] bool): the features `CrossTokenizerLoss` reads. Texts are tokenized whole
    and then cut to `max_length` tokens (`teacher_max_length` for the teacher, default the same); a chunk that loses
    a token to the cut on either side is dropped on both. ``loss_starts`` (character positions, one per text)
    drops chunks that start before it, e.g. the prompt of a prompt + completion text. `chunks`: "unconstrained"
    (shortest shared chunks) or "space" (chunks end only before whitespace), see `align_tokenizations`.
    Both tokenizers must be fast (offsets come from the Rust tokenizers).
    """

    def __init__(self, teacher_tok, student_tok, max_length: int, *, chunks: str = "unconstrained",
                 teacher_max_length: int | None = None, add_special_tokens: bool = True):
        for who, tok in (("teacher", teacher_tok), ("student", student_tok)):
            if not getattr(tok, "is_fast", False):
                raise ConfigError(f"cross-tokenizer alignment needs character offsets, so a fast tokenizer; the "
                                  f"{who} tokenizer {type(tok).__name__} is not (load it with use_fast=True)")
        if chunks not in CHUNK_MODES:
            raise ConfigError(f"chunks must be one of {', '.join(CHUNK_MODES)}, got {chunks!r}")
        t_max = max_length if teacher_max_length is None else teacher_max_length
        if min(max_length, t_max) < 2:
            raise ConfigError(f"max_length must be >= 2 tokens (one context token, one predicted), got "
                              f"student {max_length}, teacher {t_max}")
        self.tokenizers = {"teacher": teacher_tok, "student": student_tok}
        self.max_length = {"teacher": int(t_max), "student": int(max_length)}
        self.chunks = chunks
        self.add_special_tokens = add_special_tokens
        self.byte_level = {k: _is_byte_level(t) for k, t in self.tokenizers.items()}
        self.space_masks = {k: space_token_mask(t) for k, t in self.tokenizers.items()}

    def _encode(self, who: str, texts: list[str]):
        """(ids, tokens, offsets, special mask) per text, at most max_length + 1 tokens: the first token past the cut
        is kept only to tell whether a boundary falls before it. Straight from the Rust tokenizer: the same ids as
        ``tokenizer(text)``, without building Python lists of the whole text."""
        keep = self.max_length[who] + 1
        encs = self.tokenizers[who].backend_tokenizer.encode_batch(texts, add_special_tokens=self.add_special_tokens)
        return [(e.ids[:keep], e.tokens[:keep], e.offsets[:keep], [bool(x) for x in e.special_tokens_mask[:keep]])
                for e in encs]

    def align(self, texts: Sequence[str]) -> list[tuple[list[int], list[int], list[AlignedChunk]]]:
        """Per text: (teacher ids, student ids, aligned chunks), ids cut to max_length + 1 (see `_encode`)."""
        texts = list(texts)
        t_rows, s_rows = self._encode("teacher", texts), self._encode("student", texts)
        out = []
        for text, (t_ids, t_tok, t_off, t_sp), (s_ids, s_tok, s_off, s_sp) in zip(texts, t_rows, s_rows):
            chunks = align_tokenizations(text, t_tok, t_off, s_tok, s_off, teacher_special=t_sp,
                                         student_special=s_sp, teacher_byte_level=self.byte_level["teacher"],
                                         student_byte_level=self.byte_level["student"], chunks=self.chunks)
            out.append((t_ids, s_ids, chunks))
        return out

    def __call__(self, texts: Sequence[str], loss_starts: Sequence[int] | None = None) -> dict:
        texts = list(texts)
        if not texts:
            raise ConfigError("CrossTokenizerBatcher needs at least one text")
        if loss_starts is not None and len(loss_starts) != len(texts):
            raise ShapeMismatchError(f"loss_starts has {len(loss_starts)} entries for {len(texts)} texts")
        aligned = self.align(texts)
        t_len = max(min(len(t), self.max_length["teacher"]) for t, _, _ in aligned)
        s_len = max(min(len(s), self.max_length["student"]) for _, s, _ in aligned)
        batch = {who: {"input_ids": torch.full((len(texts), n), self._pad_id(who), dtype=torch.long),
                       "attention_mask": torch.zeros(len(texts), n, dtype=torch.long),
                       "chunk_ids": torch.full((len(texts), n), -1, dtype=torch.long),
                       "space_mask": self.space_masks[who]}
                 for who, n in (("teacher", t_len), ("student", s_len))}
        n_chunks = torch.zeros(len(texts), dtype=torch.long)
        for row, (text, (t_ids, s_ids, chunks)) in enumerate(zip(texts, aligned)):
            start = 0 if loss_starts is None else len(text[:loss_starts[row]].encode("utf-8"))
            lens = {"teacher": min(len(t_ids), self.max_length["teacher"]),
                    "student": min(len(s_ids), self.max_length["student"])}
            cids = {who: [-1] * n for who, n in lens.items()}
            cid = 0
            for ch in chunks:
                if ch.span[0] < start or max(ch.teacher) >= lens["teacher"] or max(ch.student) >= lens["student"]:
                    continue
                for who, idx in (("teacher", ch.teacher), ("student", ch.student)):
                    for k in idx:
                        cids[who][k] = cid
                cid += 1
            n_chunks[row] = cid
            for who, ids in (("teacher", t_ids), ("student", s_ids)):
                n = lens[who]
                batch[who]["input_ids"][row, :n] = torch.tensor(ids[:n], dtype=torch.long)
                batch[who]["attention_mask"][row, :n] = 1
                batch[who]["chunk_ids"][row, :n] = torch.tensor(cids[who], dtype=torch.long)
        batch["n_chunks"] = n_chunks
        return batch

    def _pad_id(self, who: str) -> int:
        tok = self.tokenizers[who]
        for pid in (tok.pad_token_id, tok.eos_token_id):
            if pid is not None:
                return int(pid)
        return 0


# ---------------------------------------------------------------- loss


def chunk_logprobs(logits: Tensor, input_ids: Tensor, chunk_ids: Tensor, n_chunks: int,
                   space_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-chunk log-likelihoods [B, C] of a model's own tokens, and [B, C] bool: the chunk is scored.

    `logits` [B, L, V] unshifted (position t predicts token t+1), `input_ids` / `chunk_ids` [B, L]. A chunk is
    scored when it has tokens here and none at position 0 (which nothing predicts). With `space_mask` ([V'] bool,
    V' <= V) the log-prob that the token after the chunk's last token is in the mask is added (append_space).
    """
    b, n, v = logits.shape
    if input_ids.shape != (b, n) or chunk_ids.shape != (b, n):
        raise ShapeMismatchError(
            f"logits {tuple(logits.shape)} need input_ids and chunk_ids of shape {(b, n)}, got "
            f"{tuple(input_ids.shape)} and {tuple(chunk_ids.shape)}; pass the model's logits unshifted, one row per "
            "input token")
    if int(chunk_ids.max()) >= n_chunks:
        raise ShapeMismatchError(f"chunk id {int(chunk_ids.max())} >= n_chunks {n_chunks}")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 -> fp32, fp64 stays
    lse = logits.logsumexp(-1)  # [B, L]
    tok = logits[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1) - lse[:, :-1]  # log p(token t | < t)
    slot = chunk_ids[:, 1:] + 1  # slot 0 collects tokens in no chunk
    sums = tok.new_zeros(b, n_chunks + 1).scatter_add(1, slot, tok)[:, 1:]
    counts = tok.new_zeros(b, n_chunks + 1).scatter_add(1, slot, torch.ones_like(tok))[:, 1:]
    first = torch.zeros(b, n_chunks + 1, dtype=torch.bool, device=logits.device)
    first[torch.arange(b, device=logits.device), chunk_ids[:, 0] + 1] = True
    valid = (counts > 0) & ~first[:, 1:]
    if space_mask is not None:
        if space_mask.dim() != 1 or space_mask.numel() > v:
            raise ShapeMismatchError(f"space_mask must be [V'] with V' <= {v} (the logits' vocabulary), got "
                                     f"{tuple(space_mask.shape)}")
        keep = torch.zeros(v, dtype=torch.bool, device=logits.device)
        keep[:space_mask.numel()] = space_mask.to(logits.device, torch.bool)
        if not keep.any():
            raise ConfigError("space_mask marks no token; build it with space_token_mask(tokenizer)")
        space_lp = logits.masked_fill(~keep, float("-inf")).logsumexp(-1) - lse  # [B, L]
        pos = torch.arange(n, device=logits.device).expand(b, n)
        last = torch.zeros(b, n_chunks + 1, dtype=torch.long, device=logits.device)
        last = last.scatter_reduce(1, chunk_ids + 1, pos, reduce="amax", include_self=True)[:, 1:]
        sums = sums + torch.where(valid, space_lp.gather(1, last), 0.0)
    return sums, valid


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, precise at both ends (Mächler 2012), as tokenkit's `log1mexp`."""
    small = x < -math.log(2.0)
    return torch.where(small, torch.log1p(-torch.exp(torch.where(small, x, -1.0))),
                       torch.log(-torch.expm1(torch.where(small, -1.0, x))))


def binarised_divergence(teacher_logp: Tensor, student_logp: Tensor, divergence: str = "binary_kl",
                         T: float = 100.0) -> Tensor:
    """Elementwise divergence between Bernoulli(p^(1/T)) and Bernoulli(q^(1/T)), given log p and log q (<= 0).

    ``binary_kl``: KL(teacher || student); ``binary_ce``: tokenkit's default, KL plus the teacher's binary entropy;
    ``reverse_binary_kl``: KL(student || teacher); ``abs``: |log p - log q| (tokenkit's "abs", no temperature).
    """
    if divergence not in ALM_DIVERGENCES:
        raise ConfigError(f"unknown ALM divergence {divergence!r}; choose one of {', '.join(ALM_DIVERGENCES)}")
    if not T > 0:
        raise ConfigError(f"temperature T must be > 0, got {T}")
    if divergence == "abs":
        return (teacher_logp - student_logp).abs()
    a = teacher_logp / T - _EPS
    c = student_logp / T - _EPS
    p, q = a.exp(), c.exp()
    if divergence == "binary_ce":
        return -(p * c + (1 - p) * _log1mexp(c))
    if divergence == "binary_kl":
        return p * (a - c) + (1 - p) * (_log1mexp(a) - _log1mexp(c))
    return q * (c - a) + (1 - q) * (_log1mexp(c) - _log1mexp(a))


def alm_loss(student_logits: Tensor, teacher_logits: Tensor, student_ids: Tensor, teacher_ids: Tensor,
             student_chunks: Tensor, teacher_chunks: Tensor, *, divergence: str = "binary_kl", T: float = 100.0,
             student_space_mask: Tensor | None = None, teacher_space_mask: Tensor | None = None,
             reduction: str = "mean") -> Tensor:
    """ALM: the mean over chunks scored on both sides of `binarised_divergence(teacher chunk logp, student's)`.

    Teacher tensors are detached. ``reduction="none"`` gives [B, C] with 0 where a chunk is not scored.
    Space masks: both or neither (append_space).
    """
    if student_logits.shape[0] != teacher_logits.shape[0]:
        raise ShapeMismatchError(f"student batch {student_logits.shape[0]} != teacher batch {teacher_logits.shape[0]}")
    if (student_space_mask is None) != (teacher_space_mask is None):
        raise ConfigError("append_space needs a space_mask for both the student and the teacher")
    c = int(max(student_chunks.max(), teacher_chunks.max())) + 1
    s_lp, s_ok = chunk_logprobs(student_logits, student_ids, student_chunks, c, student_space_mask)
    with torch.no_grad():
        t_lp, t_ok = chunk_logprobs(teacher_logits.detach(), teacher_ids, teacher_chunks, c, teacher_space_mask)
    ok = s_ok & t_ok
    d = binarised_divergence(t_lp.clamp(max=0.0), s_lp.clamp(max=0.0), divergence, T)
    d = torch.where(ok, d, 0.0)
    if reduction == "none":
        return d
    if reduction != "mean":
        raise ConfigError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return d.sum() / ok.sum().clamp(min=1)


def _side(outputs: Outputs | None, who: str, key: str) -> Tensor:
    if outputs is None or outputs.logits is None:
        raise ConfigError(f"cross_tokenizer needs {who} logits (unshifted, over the {who}'s own input ids)")
    if key not in outputs.features:
        raise ConfigError(f"cross_tokenizer needs {who}.features['{key}'] (from CrossTokenizerBatcher); has "
                          f"{sorted(outputs.features) or 'none'}")
    return outputs.features[key]


class CrossTokenizerLoss(DistillLoss):
    """Cross-tokenizer KD: Approximate Likelihood Matching (Minixhofer, Vulić & Ponti 2025, arXiv 2503.20083).

    Matches the teacher's and the student's likelihoods of the same text chunks, so teacher and student may
    tokenize differently; see the module docstring for what it reads from `Outputs` and how chunks are found.
    Options: `T` (tokenkit's bce_temp, 100), `divergence` (binary_kl, binary_ce, reverse_binary_kl, abs),
    `append_space` (add P(next token starts a word) to each chunk, tokenkit's default alm_mode), `chunks`
    ("unconstrained" or "space": read by the trainer to build its `CrossTokenizerBatcher`).
    """

    needs_labels = False

    def __init__(self, *, T: float = 100.0, divergence: str = "binary_kl", append_space: bool = False,
                 chunks: str = "unconstrained"):
        super().__init__()
        if divergence not in ALM_DIVERGENCES:
            raise ConfigError(f"unknown ALM divergence {divergence!r}; choose one of {', '.join(ALM_DIVERGENCES)}")
        if not T > 0:
            raise ConfigError(f"temperature T must be > 0, got {T}")
        if chunks not in CHUNK_MODES:
            raise ConfigError(f"chunks must be one of {', '.join(CHUNK_MODES)}, got {chunks!r}")
        self.T, self.divergence, self.append_space, self.chunks = float(T), divergence, bool(append_space), chunks

    def _inputs(self, student: Outputs, teacher: Outputs | None) -> dict:
        s_ids, t_ids = _side(student, "student", "input_ids"), _side(teacher, "teacher", "input_ids")
        space = self.append_space
        return dict(student_logits=student.logits, teacher_logits=teacher.logits, student_ids=s_ids,
                    teacher_ids=t_ids, student_chunks=_side(student, "student", "chunk_ids"),
                    teacher_chunks=_side(teacher, "teacher", "chunk_ids"),
                    student_space_mask=_side(student, "student", "space_mask") if space else None,
                    teacher_space_mask=_side(teacher, "teacher", "space_mask") if space else None,
                    divergence=self.divergence, T=self.T)

    def forward(self, student: Outputs, teacher: Outputs | None, labels: Tensor | None = None) -> Tensor:
        return alm_loss(**self._inputs(student, teacher))

    def per_chunk(self, student: Outputs, teacher: Outputs | None) -> Tensor:
        """[B, C] divergences, 0 on chunks not scored (forward is their mean over scored chunks)."""
        return alm_loss(**self._inputs(student, teacher), reduction="none")

    def extra_repr(self) -> str:
        return f"T={self.T}, divergence={self.divergence}, append_space={self.append_space}, chunks={self.chunks}"


if "cross_tokenizer" not in LOSSES:  # tolerate a re-import (importlib.reload)
    LOSSES.register("cross_tokenizer", CrossTokenizerLoss)
