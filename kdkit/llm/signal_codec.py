"""The compact top-k codec: a teacher's top-k next-token signal in about half the plain layout's bytes on disk.

Why each part (bytes and KL for SmolLM2-135M over GSM8K text in leaderboards/signal-compression.md):

- Ids are kept sorted ascending, as gaps (``id_gaps``: the smallest id, then differences): which k of V ids were
  kept is all there is to store about them, the order among them being already in the log-probs. Gaps are small
  numbers whose high byte varies little, so zstd over the byte-split gaps (Parquet's BYTE_STREAM_SPLIT) stores
  them in about two thirds of the bytes the same ids take in rank order.
- Log-probs are kept relative to the top-1, d_i = log p_1 - log p_i in [0, d_max], as ``bits``-bit codes on a
  uniform grid of step d_max / (2^bits - 1) per position (``step``). An error e_i in log p_i costs about
  p_i e_i^2 / 2 nats of KL, so a uniform log-domain grid spends its error where p_i is small: at k = 64, 4 bits
  add ~2% to the reconstruction KL, which the uniform tail dominates.
- The mass outside the top k is stored (``tail_logmass`` = log sum of the tail's probabilities, computed from the
  full distribution) instead of being implied by 1 - sum(top): the decoded top-k then sums to 1 - m, so the
  top-1's own value needs no storage and a peaked position keeps its small tail, which 1 - sum of rounded
  fp16/bf16 values loses (1-3% of positions get a tail of mass 0: an infinite KL against the teacher). Tails
  below float32's resolution of 1 - m (~1e-7) are still lost where the loss computes 1 - sum(top).

Decoding gives ids and float32 log-probs in descending order: the plain top-k signal every loss already reads.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

MAX_BITS = 8  # codes are stored one per byte (Parquet's dictionary encoding bit-packs them on disk)


def gap_dtype(vocab_size: int) -> str:
    """The storage dtype of the id gaps: uint16 while every id fits in 16 bits, int32 beyond."""
    return "uint16" if vocab_size <= 1 << 16 else "int32"


def tail_logmass(logprobs: Tensor, indices: Tensor) -> Tensor:
    """log of the probability outside the kept ids [...], from full log-probs [..., V] (-inf: no tail): the tail's
    own probabilities summed, not 1 - sum(top), which cancels to 0 when the tail is below float precision."""
    return logprobs.exp().scatter_(-1, indices, 0.0).sum(-1).log()


def encode_compact(indices: Tensor, logprobs: Tensor, tail: Tensor, bits: int) -> dict[str, Tensor]:
    """Top-k ids and log-probs [..., k] (any order) and the tail's log-mass [...] as the stored tensors:
    id_gaps [..., k] (int64 here; stored uint16 or int32), codes [..., k] (uint8, in sorted-id order),
    step [...] (float16) and tail_logmass [...] (float16)."""
    levels = (1 << bits) - 1
    ids, order = indices.sort(dim=-1)
    vals = logprobs.float().gather(-1, order)
    d = (vals.max(-1, keepdim=True).values - vals).nan_to_num(posinf=1e4).clamp(max=1e4)  # -inf entries: far down
    step = (d.amax(-1) / levels).clamp(min=2.0**-14).half()  # the decoder's step: quantise with it, not the exact one
    codes = torch.round(d / step.float()[..., None]).clamp(max=levels).to(torch.uint8)
    gaps = torch.diff(ids, dim=-1, prepend=torch.zeros_like(ids[..., :1]))
    return {"id_gaps": gaps, "codes": codes, "step": step, "tail_logmass": tail.half()}


def decode_compact(id_gaps: Tensor, codes: Tensor, step: Tensor, tail: Tensor) -> tuple[Tensor, Tensor]:
    """(ids int64, log-probs float32) [..., k], descending by log-prob: the top-k signal the codes stand for, scaled
    so that the kept ids hold 1 - exp(tail) of the mass."""
    ids = id_gaps.long().cumsum(-1)
    d = codes.float() * step.float()[..., None]
    kept = torch.log1p(-tail.float().exp())[..., None]  # log(1 - m)
    vals = kept - torch.logsumexp(-d, dim=-1, keepdim=True) - d
    vals, order = vals.sort(dim=-1, descending=True, stable=True)
    return ids.gather(-1, order), vals


def payload_bytes(k: int, bits: int, vocab_size: int) -> float:
    """Bytes per position before Parquet's encodings and zstd: k gaps at full width, k codes of `bits` bits, the
    float16 step and tail log-mass."""
    gap_bits = 16 if gap_dtype(vocab_size) == "uint16" else 32
    return (k * gap_bits + k * bits + 32) / 8


def plain_payload_bytes(k: int, value_bits: int, vocab_size: int) -> float:
    """The same figure for plain top-k: k ids at ceil(log2 V) bits and k values of `value_bits` bits (the ids are
    held as int32, which Parquet's dictionary encoding packs to at most that width before zstd)."""
    return k * (math.ceil(math.log2(max(vocab_size, 2))) + value_bits) / 8
