"""Cross-tokenizer distillation by Approximate Likelihood Matching (ALM): the text alignment and the batcher.

Minixhofer, Vulić & Ponti 2025, "Cross-Tokenizer Distillation via Approximate Likelihood Matching"
(arXiv 2503.20083; reference code bminixhofer/tokenkit: `tokenkit/align.py`, `docs/pytorch_alm_from_scratch.ipynb`).

Token-level logit KD compares two next-token distributions position by position, so it needs one shared
vocabulary (`kdkit.llm.tokenizers.require_same_tokenizer` refuses it otherwise). ALM compares what both models
can score whatever their tokenizers: the likelihood of the same piece of text.

Alignment (`align_tokenizations`, `CrossTokenizerBatcher`): the text is cut at the byte positions where both
tokenizations have a token boundary. Each chunk is a contiguous run of teacher tokens and one of student tokens
that spell the same bytes. Tokens are placed by the fast tokenizers' character offsets, taken to UTF-8 bytes.
Where offsets overlap they are refined by the token's own bytes (byte-level "Ġ" pieces or "<0xNN>" byte
fallback inside one character each get their byte; the phantom "▁" Metaspace writes before the first word
gets none); ends are made monotone, so whitespace conventions ("Ġ" vs "▁", trimmed offsets) only move where
a token starts, never where a chunk ends. Special tokens with no text (BOS) are
left out; trailing ones (EOS) on both sides form one last chunk ("the text ends here"). `chunks="space"` keeps
only boundaries followed by whitespace (or the end), tokenkit's "space" alignments: word-level chunks, which
carry less tokenization bias than the shortest chunks ("unconstrained", the default, as the notebook).

The loss over the aligned chunks (chunk likelihoods, the binarised divergence, `CrossTokenizerLoss`, registered
as ``cross_tokenizer``) is in the loss zoo, `kdkit.losses.cross_tokenizer`.
`CrossTokenizerBatcher(teacher_tok, student_tok, max_length)(texts)` returns what that loss reads as
``batch["teacher"]`` / ``batch["student"]`` (plus ``attention_mask``), so a trainer does
``Outputs(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b)`` for each side.

Not included: tokenkit's "unbiased" chunks (they need tokenizer-pair bias matrices counted over a corpus),
`merge_by_space_prob`, chunk-size pooling and the hidden-state (latents) and side-path losses.
"""

import re
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..errors import ConfigError, ShapeMismatchError
from ..losses.cross_tokenizer import CHUNK_MODES

__all__ = ["AlignedChunk", "align_tokenizations", "space_token_mask", "CrossTokenizerBatcher", "CHUNK_MODES"]

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
