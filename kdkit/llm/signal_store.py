"""Teacher-signal store: run the teacher once over token blocks, keep its next-token signal on disk, train later.

Offline KD pays for the teacher's forward pass once, however many student runs, epochs or sweeps follow, and
lets a student train where the teacher does not fit. The typed dense/sparse signals follow DistillKit
(arcee-ai, ``distillkit/signals``); the unbiased sparse estimator is RS-KD (Anshumann et al., "Sparse Logit
Sampling: Accelerating Knowledge Distillation in LLMs", ACL 2025, arXiv:2503.16870).

Kinds (``SignalSpec.kind``), with p = softmax(teacher logits / spec.temperature):

- ``dense``   log p for every vocabulary entry (float16, bfloat16 stored as raw uint16, or float32). Exact, but
  V values per token: only for small vocabularies or short runs.
- ``topk``    the k most likely ids (int32, descending) and their log p. Top-k KD is biased (the tail mass is lost
  or must be guessed); the loss densifies with a uniform tail (`sparse_to_dense_logprobs(fill="uniform")`),
  renormalises on the support (``fill="none"``), or uses the support only (``topk_mode="support"``).
  ``codec="compact"`` stores the same signal in about half the bytes on disk (`kdkit.llm.signal_codec`: sorted-id
  gaps, ``bits``-bit log-prob codes relative to the top-1, and the tail's mass); reading decodes it to plain
  top-k (float32 log-probs), so every loss reads it unchanged.
- ``sampled`` RS-KD: N = ``samples`` ids drawn i.i.d. with replacement from a proposal q ∝ p^(1/τ)
  (τ = ``proposal_temperature``; τ = 1 is the paper's choice q = p); per position the distinct ids, their counts
  c (int16) and log p are kept, plus the ratio p/q (float32) when τ != 1, as ragged lists (a peaked teacher
  yields a handful of distinct ids, not N; batches pad to the widest position with weight 0). The target
  w_i = c_i/N * p_i/q_i has E[w_i] = p_i exactly (E[c_i] = N q_i), so the loss sum_i w_i (log p_i - log s_i)
  is an unbiased estimate of the forward KL(p || s), and its gradient w.r.t. the student logits,
  sum(w) s - w, is unbiased for s - p (with q = p, sum(w) = 1 and w = c/N).

Alignment: a row is one block of L token ids; position t of a signal is the teacher's prediction of token t+1,
for t = 0..L-2 (P = L-1 positions, the same shift the LM trainer applies to student logits). ``labels`` [L] is
-100 where a token is not counted; position t counts when labels[t+1] != -100.

On disk: ``signal_store.json`` (format, spec with its temperature, vocabulary size, tokenizer fingerprint and
chat-template hash, teacher name and config hash, rows, block size, column dtypes and shapes, per-shard
rows/bytes/sha256, bytes per position on disk and before zstd) beside zstd-compressed Parquet
shards, one list column per tensor (fixed-size, or ragged for sampled entries). The store is built in a
``.NAME.partial`` folder beside the target and renamed into place when complete; each shard is written to a
temporary file and renamed, so a crashed or killed write resumes at the first unfinished shard (sampling seeds
are per row, so the resumed store equals an uninterrupted one). Opening checks every shard against its recorded size, row count and SHA-256, so
a damaged shard is named instead of trained on. Reading goes through `datasets`: an IterableDataset streamed from
the shards, or a memory-mapped Dataset (random access for the trainer's shuffled batches).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..budget import CostLine
from ..errors import CheckpointError, ConfigError, KdkitError, ShapeMismatchError, TokenizerMismatchError
from ..divergence import Divergence
from ..losses.token import signal_kd_loss as token_signal_kd_loss
from ..signals import DenseLogits, Sampled, TeacherSignal, TopK
from .signal_codec import MAX_BITS, decode_compact, encode_compact, gap_dtype, payload_bytes, plain_payload_bytes
from .signal_codec import tail_logmass
from .tokenizers import chat_template_sha256, tokenizer_fingerprint

FORMAT = "kdkit-signal-store/1"
META = "signal_store.json"
PLAN = "plan.json"
KINDS = ("dense", "topk", "sampled")
STORAGE_DTYPES = ("float16", "bfloat16", "float32")
CODECS = ("plain", "compact")
_TARGET_SHARD_BYTES = 256 << 20


@dataclass(frozen=True)
class SignalSpec:
    """What to keep of the teacher's next-token distribution (see the module docstring for each kind)."""

    kind: Literal["dense", "topk", "sampled"] = "topk"
    k: int = 64                        # topk: ids kept per position
    samples: int = 64                  # sampled: draws N per position (distinct ids kept: at most min(N, V))
    temperature: float = 1.0           # the signal is p = softmax(logits / temperature)
    proposal_temperature: float = 1.0  # sampled: draw from q ∝ p^(1/τ); 1 draws from p itself
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"  # plain codec: storage of log-probabilities
    seed: int = 0                      # sampled: row r draws with seed (seed, r), independent of batching
    codec: Literal["plain", "compact"] = "plain"  # topk: plain ids and values, or `kdkit.llm.signal_codec`
    bits: int = 4                      # compact: bits per log-prob code (uniform grid below the top-1)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"signal kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.dtype not in STORAGE_DTYPES:
            raise ConfigError(f"signal dtype must be one of {', '.join(STORAGE_DTYPES)}, got {self.dtype!r}")
        if not self.temperature > 0 or not self.proposal_temperature > 0:
            raise ConfigError(f"temperatures must be > 0, got temperature={self.temperature}, "
                              f"proposal_temperature={self.proposal_temperature}")
        if self.kind == "topk" and self.k < 1:
            raise ConfigError(f"topk signals need k >= 1, got {self.k}")
        if self.kind == "sampled" and not 1 <= self.samples <= 32767:
            raise ConfigError(f"sampled signals need 1 <= samples <= 32767 (counts are int16), got {self.samples}")
        if self.codec not in CODECS:
            raise ConfigError(f"signal codec must be one of {', '.join(CODECS)}, got {self.codec!r}")
        if self.codec == "compact" and self.kind != "topk":
            raise ConfigError(f"signal codec 'compact' stores top-k signals (kind=topk) only, got kind={self.kind!r}")
        if not (isinstance(self.bits, int) and 2 <= self.bits <= MAX_BITS):
            raise ConfigError(f"signal bits must be an integer from 2 to {MAX_BITS} (compact log-prob codes), "
                              f"got {self.bits!r}")


# ------------------------------------------------------------------ RS-KD sampling


def sample_sparse_targets(logprobs: Tensor, samples: int, *, generator: torch.Generator | None = None,
                          proposal_temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """RS-KD draws for teacher log-probs [..., V]: distinct ids, counts and ratios p/q, each [..., W].

    N = `samples` ids are drawn with replacement from q ∝ p^(1/proposal_temperature); W = min(N, V) slots hold
    the distinct ids by decreasing count, unused slots id 0 with count 0 and ratio 0. The unbiased estimate of p
    is counts / N * ratio (the ratio is exactly 1 when q = p).
    """
    V = logprobs.shape[-1]
    lead = logprobs.shape[:-1]
    log_p = logprobs.reshape(-1, V).float()
    log_q = log_p if proposal_temperature == 1.0 else F.log_softmax(log_p / proposal_temperature, dim=-1)
    draws = torch.multinomial(log_q.exp(), samples, replacement=True, generator=generator)  # [rows, N]
    counts = torch.zeros_like(log_p).scatter_add_(1, draws, torch.ones_like(draws, dtype=log_p.dtype))
    width = min(samples, V)
    cnt, ids = counts.topk(width, dim=-1)
    empty = cnt == 0
    ids = ids.masked_fill(empty, 0)
    if proposal_temperature == 1.0:
        ratio = torch.ones_like(cnt)
    else:
        ratio = (log_p.gather(1, ids) - log_q.gather(1, ids)).exp()
    ratio = ratio.masked_fill(empty, 0.0)
    return ids.reshape(*lead, width), cnt.to(torch.int16).reshape(*lead, width), ratio.reshape(*lead, width)


def _row_generator(seed: int, row: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + row) % (2**63 - 1))
    return g


# ------------------------------------------------------------------ layout


def _columns(spec: SignalSpec, vocab_size: int, positions: int) -> dict[str, tuple[str, list[int] | None]]:
    """name -> (storage dtype, per-row shape) of every stored tensor; shape None: a ragged list per row (the
    distinct sampled entries of every position, concatenated; ``nnz`` [P] says how many belong to each)."""
    cols = {"row": ("int64", []), "input_ids": ("int32", [positions + 1]), "labels": ("int32", [positions + 1])}
    if spec.kind == "dense":
        cols["logprobs"] = (spec.dtype, [positions, vocab_size])
    elif spec.kind == "topk" and spec.codec == "compact":
        cols["id_gaps"] = (gap_dtype(vocab_size), [positions, spec.k])
        cols["codes"] = ("uint8", [positions, spec.k])
        cols["step"] = ("float16", [positions])
        cols["tail_logmass"] = ("float16", [positions])
    elif spec.kind == "topk":
        cols["indices"] = ("int32", [positions, spec.k])
        cols["logprobs"] = (spec.dtype, [positions, spec.k])
    else:
        cols["nnz"] = ("int16", [positions])
        cols["indices"] = ("int32", None)
        cols["counts"] = ("int16", None)
        cols["logprobs"] = (spec.dtype, None)
        if spec.proposal_temperature != 1.0:
            cols["ratio"] = ("float32", None)
    return cols


_ARROW = {"int64": "int64", "int32": "int32", "int16": "int16", "uint16": "uint16", "uint8": "uint8",
          "float16": "float16", "float32": "float32", "bfloat16": "uint16"}  # bfloat16 travels as its raw 16 bits
_TORCH = {"int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "uint16": torch.uint16,
          "uint8": torch.uint8, "float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
_NUMPY = {"int64": np.int64, "int32": np.int32, "int16": np.int16, "uint16": np.uint16, "uint8": np.uint8,
          "float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}


def _schema(cols: dict):
    import pyarrow as pa

    fields = []
    for name, (dtype, shape) in cols.items():
        t = pa.from_numpy_dtype(np.dtype(_ARROW[dtype]))
        element = pa.field("element", t, nullable=False)
        kind = t if shape == [] else pa.list_(element) if shape is None else pa.list_(element, int(np.prod(shape)))
        fields.append(pa.field(name, kind, nullable=False))
    return pa.schema(fields)


def _to_arrow_table(tensors: dict[str, Tensor], cols: dict, schema):
    """One row per block; ragged columns take the first ``nnz`` slots of each position of a padded [B, P, W]."""
    import pyarrow as pa

    arrays = []
    for name, (dtype, shape) in cols.items():
        t = tensors[name].detach().to("cpu")
        if shape is None:
            nnz = tensors["nnz"].to("cpu", torch.int64)
            t = t[torch.arange(t.shape[-1]) < nnz[..., None]]  # row-major: rows, then positions, then slots
            offsets = torch.cat([torch.zeros(1, dtype=torch.int64), nnz.sum(-1).cumsum(0)])
        t = t.to(_TORCH[dtype]).contiguous()
        flat = (t.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else t.numpy()).reshape(-1)
        ftype = schema.field(name).type
        if shape == []:
            arrays.append(pa.array(flat, type=ftype))
        elif shape is None:
            arrays.append(pa.ListArray.from_arrays(pa.array(offsets.to(torch.int32).numpy()),
                                                   pa.array(flat, type=ftype.value_type)))
        else:
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(flat, type=ftype.value_type),
                                                            int(np.prod(shape))))
    return pa.Table.from_arrays(arrays, schema=schema)


def _from_arrow_table(table, cols: dict) -> dict[str, Tensor]:
    """Tensors [n, *shape]; ragged columns padded to [n, P, W] (W: the widest position, unused slots 0)."""
    out = {}
    n = table.num_rows
    for name, (dtype, shape) in sorted(cols.items(), key=lambda c: c[1][1] is None):  # nnz before the ragged
        col = table.column(name).combine_chunks()
        flat = (col if shape == [] else col.flatten()).to_numpy(zero_copy_only=False)
        flat = np.ascontiguousarray(flat, dtype=_NUMPY[dtype])
        if not flat.flags.writeable:
            flat = flat.copy()
        t = torch.from_numpy(flat)
        if dtype == "bfloat16":
            t = t.view(torch.int16).view(torch.bfloat16)
        if shape is None:
            nnz = out["nnz"].long()
            slots = torch.arange(max(1, int(nnz.max()) if nnz.numel() else 1)) < nnz[..., None]
            out[name] = torch.zeros(slots.shape, dtype=t.dtype).masked_scatter_(slots, t)
        else:
            out[name] = t.reshape(n, *shape)
    return out


def _payload_bytes(spec: SignalSpec, vocab_size: int) -> float | None:
    """The signal's bytes per position before Parquet's encodings and zstd (top-k kinds; None otherwise)."""
    if spec.kind != "topk":
        return None
    if spec.codec == "compact":
        return payload_bytes(spec.k, spec.bits, vocab_size)
    return plain_payload_bytes(spec.k, 8 * np.dtype(_NUMPY[spec.dtype]).itemsize, vocab_size)


_DICTIONARY = ("int64", "int32", "int16", "uint8")  # ids, counts, codes: few distinct values


def _write_options(cols: dict) -> dict:
    """Dictionary-encode ids, counts and codes, byte-stream-split floats and id gaps (their high bytes are nearly
    constant): both compress better under zstd."""
    ints = [n if s == [] else f"{n}.list.element" for n, (d, s) in cols.items() if d in _DICTIONARY]
    floats = [f"{n}.list.element" for n, (d, s) in cols.items() if d not in _DICTIONARY and s != []]
    return {"compression": "zstd", "compression_level": 3, "use_dictionary": ints, "use_byte_stream_split": floats}


# ------------------------------------------------------------------ identity


def _sha256_file(path: Path) -> str:
    from ..checkpoint import sha256

    return sha256(path)


def _teacher_identity(teacher) -> dict:
    """Name and a hash of the architecture config (not the weights: hashing billions of parameters is too slow);
    a served teacher's URL, model id and request settings."""
    if hasattr(teacher, "identity"):
        return teacher.identity()
    cfg = getattr(teacher, "config", None)
    name = getattr(teacher, "name_or_path", None) or getattr(cfg, "_name_or_path", None) or type(teacher).__name__
    ident = {"name": str(name), "class": type(teacher).__name__,
             "parameters": int(sum(p.numel() for p in teacher.parameters())) if hasattr(teacher, "parameters") else 0}
    if cfg is not None and hasattr(cfg, "to_dict"):
        d = {k: v for k, v in cfg.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
        blob = json.dumps(d, sort_keys=True, default=str).encode()
        ident["config_sha256"] = hashlib.sha256(blob).hexdigest()
    return ident


def _kdkit_version() -> str:
    """The installed kdkit's version, recorded in the store ("unknown" for a source tree that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kdkit")
    except PackageNotFoundError:
        return "unknown"


def _tensor_sha256(*tensors: Tensor | None) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(b"-" if t is None else t.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------ writing


def _teacher_signal(teacher, ids: Tensor, mask: Tensor | None, spec: SignalSpec, vocab_size: int,
                    row0: int) -> dict[str, Tensor]:
    """The signal tensors of one batch of blocks, from one teacher forward pass (or a served teacher's top-k)."""
    if hasattr(teacher, "topk_signal"):
        return _served_signal(teacher, ids, mask, spec)
    kwargs = {"input_ids": ids} if mask is None else {"input_ids": ids, "attention_mask": mask}
    out = teacher(**kwargs)
    logits = out.logits if hasattr(out, "logits") else out
    if logits.shape[-1] != vocab_size or logits.shape[:2] != ids.shape:
        raise ShapeMismatchError(f"the teacher returned logits {tuple(logits.shape)} for blocks {tuple(ids.shape)}; "
                                 f"expected [..., {vocab_size}] (its config's vocabulary size)")
    logp = F.log_softmax(logits[:, :-1].float() / spec.temperature, dim=-1)  # position t predicts token t+1
    if spec.kind == "dense":
        return {"logprobs": logp}
    if spec.kind == "topk":
        vals, idx = logp.topk(spec.k, dim=-1)
        if spec.codec == "compact":
            return encode_compact(idx, vals, tail_logmass(logp, idx), spec.bits)
        return {"indices": idx, "logprobs": vals}
    got: dict[str, list] = {"indices": [], "counts": [], "logprobs": [], "ratio": []}
    for r in range(logp.shape[0]):
        g = _row_generator(spec.seed, row0 + r, logp.device)
        idx, cnt, ratio = sample_sparse_targets(logp[r], spec.samples, generator=g,
                                                proposal_temperature=spec.proposal_temperature)
        got["indices"].append(idx)
        got["counts"].append(cnt)
        got["logprobs"].append(logp[r].gather(-1, idx).masked_fill(cnt == 0, 0.0))
        got["ratio"].append(ratio)
    out = {k: torch.stack(v) for k, v in got.items()}
    out["nnz"] = (out["counts"] > 0).sum(-1).to(torch.int16)  # distinct ids come first (by decreasing count)
    return out


def _served_signal(teacher, ids: Tensor, mask: Tensor | None, spec: SignalSpec) -> dict[str, Tensor]:
    """A served teacher (`kdkit.llm.teacher_server`) returns its top-`teacher.k` log-probs at temperature 1:
    a top-k store of k <= that, made at temperature 1; the compact codec's tail mass is 1 - the top-k's."""
    if spec.kind != "topk" or spec.temperature != 1.0 or spec.k > teacher.k:
        raise ConfigError(f"a served teacher gives top-{teacher.k} log-probs at temperature 1; this store asks for "
                          f"kind={spec.kind}, k={spec.k}, temperature={spec.temperature}")
    signal = teacher.topk_signal(ids, mask)
    idx, vals = signal.indices[..., :spec.k], signal.logprobs[..., :spec.k]
    if spec.codec == "compact":
        tail = torch.log1p(-vals.exp().sum(-1).clamp(max=1.0))
        return encode_compact(idx, vals, tail, spec.bits)
    return {"indices": idx, "logprobs": vals}


def _vocab_size(teacher) -> int:
    if isinstance(getattr(teacher, "vocab_size", None), int):  # a served teacher
        return teacher.vocab_size
    cfg = getattr(teacher, "config", None)
    v = getattr(cfg, "vocab_size", None)
    if v is None and hasattr(teacher, "get_output_embeddings") and teacher.get_output_embeddings() is not None:
        v = teacher.get_output_embeddings().weight.shape[0]
    if v is None:
        raise ConfigError("cannot tell the teacher's vocabulary size (no config.vocab_size, no output embeddings)")
    return int(v)


def _shard_ok(path: Path, rows: int) -> bool:
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(path).num_rows == rows
    except Exception:
        return False


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def write_signal_store(teacher_model, blocks: Tensor, out_dir, spec: SignalSpec | None = None, tokenizer=None, *,
                       batch_size: int = 8, attention_mask: Tensor | None = None, labels: Tensor | None = None,
                       progress: bool = True, shard_rows: int | None = None, overwrite: bool = False) -> Path:
    """Run `teacher_model` (a causal LM: ``model(input_ids).logits``) over `blocks` [n, L] and store its signal.

    `tokenizer` is the one that made the blocks; its fingerprint is recorded and checked on reading. `labels`
    [n, L] (-100: not counted) default to the blocks, -100 where `attention_mask` is 0. Rerunning with the same
    arguments resumes an unfinished write (finished shards are kept) or returns a finished store as it is; a
    different store already at `out_dir` is refused unless `overwrite`. Returns the store folder.
    """
    spec = spec or SignalSpec()
    if tokenizer is None:
        raise ConfigError("write_signal_store needs the tokenizer that made the blocks: its fingerprint is stored "
                          "so that a student with another tokenizer is refused")
    if not torch.is_tensor(blocks) or blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise ShapeMismatchError(f"blocks must be token ids [n >= 1, L >= 2], got "
                                 f"{tuple(blocks.shape) if torch.is_tensor(blocks) else type(blocks).__name__}")
    if blocks.dtype.is_floating_point or blocks.dtype == torch.bool:
        raise ShapeMismatchError(f"blocks must hold integer token ids, got {blocks.dtype}")
    for name, t in (("attention_mask", attention_mask), ("labels", labels)):
        if t is not None and tuple(t.shape) != tuple(blocks.shape):
            raise ShapeMismatchError(f"{name} {tuple(t.shape)} does not match the blocks {tuple(blocks.shape)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    blocks = blocks.detach().cpu().long()
    n, L = blocks.shape
    V = _vocab_size(teacher_model)
    if len(tokenizer) > V:
        raise TokenizerMismatchError(f"the tokenizer has {len(tokenizer):,} tokens but the teacher scores only {V:,}: "
                                     "they do not belong together")
    if int(blocks.min()) < 0 or int(blocks.max()) >= V:
        raise ShapeMismatchError(f"token ids range over [{int(blocks.min())}, {int(blocks.max())}], outside the "
                                 f"teacher's vocabulary [0, {V})")
    if spec.kind == "topk" and spec.k > V:
        raise ConfigError(f"topk k={spec.k} exceeds the vocabulary size {V}")
    if labels is None:
        labels = blocks.clone()
        if attention_mask is not None:
            labels[attention_mask.cpu() == 0] = -100
    labels = labels.detach().cpu().long()
    mask = None if attention_mask is None else attention_mask.detach().cpu().long()
    P = L - 1
    cols = _columns(spec, V, P)
    if shard_rows is None:
        width = [P, min(spec.samples, V)]  # ragged columns: at most this many entries
        row_bytes = sum(np.dtype(_NUMPY[d]).itemsize * int(np.prod(width if s is None else s or [1]))
                        for d, s in cols.values())
        shard_rows = max(batch_size, (_TARGET_SHARD_BYTES // row_bytes) // batch_size * batch_size)
    if shard_rows < 1:
        raise ConfigError(f"shard_rows must be >= 1, got {shard_rows}")
    plan = {
        "format": FORMAT, "kind": spec.kind, "spec": asdict(spec), "vocab_size": V, "block_size": L,
        "positions": P, "n_rows": n, "shard_rows": int(shard_rows), "alignment": "position t predicts token t+1",
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "tokenizer_size": len(tokenizer),
        "chat_template_sha256": chat_template_sha256(tokenizer),
        "teacher": _teacher_identity(teacher_model), "data_sha256": _tensor_sha256(blocks, labels, mask),
        "columns": {k: {"dtype": d, "shape": s} for k, (d, s) in cols.items()},
        "parquet": {"compression": "zstd", "compression_level": 3},
    }
    plan = json.loads(json.dumps(plan))  # as it reads back
    out = Path(out_dir)
    if (out / META).exists():
        try:
            old = json.loads((out / META).read_text())
        except (OSError, ValueError):
            old = {}
        if {k: old.get(k) for k in plan} == plan:
            return out  # already written, same data, teacher and spec
        if not overwrite:
            raise ConfigError(f"{out} already holds a different teacher-signal store; pass overwrite=True or choose "
                              "another folder")
        shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not a teacher-signal store; choose an empty or new folder")
    work = out.parent / f".{out.name}.partial"
    if work.exists():
        try:
            same = json.loads((work / PLAN).read_text()) == plan
        except (OSError, ValueError):
            same = False
        if not same:
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    _atomic_json(work / PLAN, plan)

    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    schema = _schema(cols)
    device = next((p.device for p in teacher_model.parameters()), torch.device("cpu")) \
        if hasattr(teacher_model, "parameters") else torch.device("cpu")
    was_training = getattr(teacher_model, "training", False)
    if hasattr(teacher_model, "eval"):
        teacher_model.eval()
    n_shards = -(-n // shard_rows)
    bar = tqdm(total=n, unit="block", desc="teacher signal", disable=not progress)
    todo = [s for s in range(n_shards) if not (work / f"shard-{s:05d}-of-{n_shards:05d}.parquet").exists()]
    batches = sum(-(-(min(n, (s + 1) * shard_rows) - s * shard_rows) // batch_size) for s in todo)
    cost = CostLine(batches, tqdm.write, f"teacher batches of {batch_size} blocks ({len(todo)} of {n_shards} shards "
                    f"to write)", unit="batch")  # a store of a real corpus takes hours on a CPU
    shards = []
    try:
        for s in range(n_shards):
            a, b = s * shard_rows, min(n, (s + 1) * shard_rows)
            path = work / f"shard-{s:05d}-of-{n_shards:05d}.parquet"
            if not (path.exists() and _shard_ok(path, b - a)):
                tmp = path.with_name(path.name + ".tmp")
                with pq.ParquetWriter(tmp, schema, **_write_options(cols)) as writer:
                    for i in range(a, b, batch_size):
                        j = min(b, i + batch_size)
                        ids = blocks[i:j].to(device)
                        m = None if mask is None else mask[i:j].to(device)
                        with torch.inference_mode():
                            sig = _teacher_signal(teacher_model, ids, m, spec, V, i)
                        sig.update(row=torch.arange(i, j), input_ids=blocks[i:j], labels=labels[i:j])
                        writer.write_table(_to_arrow_table(sig, cols, schema))
                        bar.update(j - i)
                        cost.tick()
                os.replace(tmp, path)
            else:
                bar.update(b - a)
            shards.append({"file": path.name, "rows": b - a, "bytes": path.stat().st_size,
                           "sha256": _sha256_file(path)})
    finally:
        bar.close()
        if was_training and hasattr(teacher_model, "train"):
            teacher_model.train()
    meta = {**plan, "shards": shards, "bytes": sum(x["bytes"] for x in shards), "kdkit_version": _kdkit_version()}
    meta["bytes_per_token"] = meta["bytes"] / (n * P)
    meta["payload_bytes_per_token"] = _payload_bytes(spec, V)
    _atomic_json(work / META, meta)
    (work / PLAN).unlink()
    os.replace(work, out)
    return out


# ------------------------------------------------------------------ reading


class SignalStore:
    """A written store: ``meta``, ``len()``, rows in order (``iter``), ``batches()``, random ``rows()``,
    ``blocks()``. Tensors come back as torch: ids and labels int64, indices int64, log-probs in the stored dtype
    (float32 from the compact codec, with the stored ``tail_logmass`` [B, P] beside them), ``weights`` (sampled)
    float32 = counts / N * ratio."""

    def __init__(self, path: Path, meta: dict, *, streaming: bool = True, cache_dir: str | Path | None = None):
        self.path, self.meta, self.streaming = Path(path), meta, streaming
        self.spec = SignalSpec(**meta["spec"])
        self.kind, self.vocab_size = self.spec.kind, int(meta["vocab_size"])
        self.block_size, self.positions = int(meta["block_size"]), int(meta["positions"])
        self.cols = {k: (v["dtype"], None if v["shape"] is None else list(v["shape"]))
                     for k, v in meta["columns"].items()}
        self.files = [self.path / s["file"] for s in meta["shards"]]
        self._cache_dir = cache_dir
        self._stream = None
        self._mapped = None

    def __len__(self) -> int:
        return int(self.meta["n_rows"])

    def __repr__(self) -> str:
        return (f"SignalStore({str(self.path)!r}, kind={self.kind!r}, rows={len(self)}, block_size={self.block_size}, "
                f"vocab_size={self.vocab_size})")

    # ---------------------------------------------------------- datasets views

    @property
    def dataset(self):
        """The `datasets` view: an IterableDataset streamed from the shards, or a memory-mapped Dataset."""
        return self._iterable() if self.streaming else self._map()

    def _iterable(self):
        if self._stream is None:
            from datasets import load_dataset

            self._stream = self._guard(lambda: load_dataset("parquet", data_files=[str(f) for f in self.files],
                                                            split="train", streaming=True))
        return self._stream

    def _map(self):
        if self._mapped is None:
            from datasets import load_dataset

            from ..data.paths import cache_dir

            where = self._cache_dir or cache_dir() / "signal_stores"
            self._mapped = self._guard(lambda: load_dataset("parquet", data_files=[str(f) for f in self.files],
                                                            split="train", cache_dir=str(where)))
        return self._mapped

    def _guard(self, fn):
        """Run `fn`; a read failure becomes a CheckpointError naming the damaged shard."""
        try:
            return fn()
        except KdkitError:
            raise
        except Exception as e:
            bad = self._find_damaged()
            if bad is None:
                raise
            raise CheckpointError(f"teacher-signal shard {bad} is unreadable or corrupt ({type(e).__name__}: {e}); "
                                  "rebuild the store with write_signal_store") from e

    def _find_damaged(self) -> Path | None:
        import pyarrow.parquet as pq

        for f in self.files:
            try:
                pq.read_table(f)
            except Exception:
                return f
        return None

    # ---------------------------------------------------------- batches

    def _batch(self, table) -> dict:
        t = _from_arrow_table(table, self.cols)
        if self.spec.codec == "compact":
            t["indices"], t["logprobs"] = decode_compact(t["id_gaps"], t["codes"], t["step"], t["tail_logmass"])
        batch = {"kind": self.kind, "temperature": self.spec.temperature, "vocab_size": self.vocab_size,
                 "row": t["row"], "input_ids": t["input_ids"].long(), "labels": t["labels"].long(),
                 "logprobs": t["logprobs"]}
        if self.kind != "dense":
            batch["indices"] = t["indices"].long()
        if "tail_logmass" in t:
            batch["tail_logmass"] = t["tail_logmass"]
        if self.kind == "sampled":
            batch["samples"] = self.spec.samples
            batch["counts"] = t["counts"]
            w = t["counts"].float() / self.spec.samples
            batch["weights"] = w * t["ratio"] if "ratio" in t else w
            if "ratio" in t:
                batch["ratios"] = t["ratio"]
        return batch

    def batches(self, batch_size: int, shuffle_buffer: int = 0, seed: int = 0,
                drop_last: bool = False) -> Iterator[dict]:
        """Batches of rows in store order (or shuffled: streaming through a `shuffle_buffer`-row buffer, memory-
        mapped as a full permutation). Each: input_ids, labels [B, L]; logprobs [B, P, V] (dense) or indices and
        logprobs [B, P, k]; sampled adds counts and weights; plus kind, temperature, vocab_size, row [B]."""
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        ds = self.dataset
        if shuffle_buffer > 0:
            # one input shard at a time: interleaving several starts reader threads that datasets waits 5 s on
            ds = (ds.shuffle(seed=seed, buffer_size=shuffle_buffer, max_buffer_input_shards=1) if self.streaming
                  else ds.shuffle(seed=seed))
        it = ds.with_format("arrow").iter(batch_size=batch_size, drop_last_batch=drop_last)
        while True:
            table = self._guard(lambda: next(it, None))
            if table is None:
                return
            yield self._batch(table)

    def __iter__(self) -> Iterator[dict]:
        """Rows in order, each a batch of one with the batch dimension dropped."""
        for b in self.batches(1):
            yield {k: v[0] if torch.is_tensor(v) else v for k, v in b.items()}

    def rows(self, indices) -> dict:
        """The batch of the given row numbers, in that order (random access through the memory-mapped view)."""
        idx = [int(i) for i in (indices.tolist() if torch.is_tensor(indices) else indices)]
        bad = [i for i in idx if not 0 <= i < len(self)]
        if bad:
            raise ConfigError(f"row(s) {bad[:5]} outside the store's {len(self)} rows")
        return self._batch(self._guard(lambda: self._map().with_format("arrow")[idx]))

    def blocks(self) -> Tensor:
        """Every stored token block [n, L] (int64), read from the input_ids column alone."""
        import pyarrow.parquet as pq

        parts = []
        for f in self.files:
            try:
                table = pq.read_table(f, columns=["input_ids"])
            except Exception as e:
                raise CheckpointError(f"teacher-signal shard {f} is unreadable or corrupt ({e})") from e
            parts.append(_from_arrow_table(table, {"input_ids": self.cols["input_ids"]})["input_ids"])
        return torch.cat(parts).long()


def _verify_shards(root: Path, shards: list[dict]) -> None:
    """Every shard's SHA-256 equals the one recorded at write time; the first damaged shard (in store order) is
    named. Shards are hashed in parallel threads."""
    from concurrent.futures import ThreadPoolExecutor

    files = [root / s["file"] for s in shards]
    with ThreadPoolExecutor(max_workers=max(1, min(len(files), os.cpu_count() or 1, 8))) as pool:
        digests = list(pool.map(_sha256_file, files))
    for f, s, digest in zip(files, shards, digests):
        if digest != s.get("sha256"):
            raise CheckpointError(f"teacher-signal shard {f} fails its SHA-256 check (its bytes changed after it was "
                                  "written: corrupt or edited); rebuild the store")


def open_signal_store(path, tokenizer=None, *, streaming: bool = True, verify: bool = True,
                      cache_dir: str | Path | None = None) -> SignalStore:
    """Open a store written by `write_signal_store`, checking its metadata and shards: sizes, Parquet footers and
    (``verify``, the default) every shard's SHA-256 against the one recorded when it was written, so flipped bytes
    are refused instead of trained on. A `tokenizer` whose fingerprint differs from the teacher's is refused with
    TokenizerMismatchError; missing or damaged files raise CheckpointError naming the file.

    Hashing reads every byte once (about 1 GB/s per core with SHA-NI; 15 MiB for 300 SmolLM2 top-64 blocks of 256
    tokens takes ~16 ms), shards in parallel threads (hashlib releases the GIL): less than one epoch of training
    reads. ``verify=False`` skips it for a store already checked on this machine."""
    import pyarrow.parquet as pq

    root = Path(path)
    meta_path = root / META
    if not meta_path.is_file():
        partial = root.parent / f".{root.name}.partial"
        hint = (f"; an unfinished write is in {partial}: rerun write_signal_store with the same arguments to finish "
                "it" if partial.exists() else "")
        raise CheckpointError(f"no teacher-signal store at {root}: {meta_path} is missing{hint}")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{meta_path} is unreadable or corrupt ({e}); rebuild the store") from e
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt != FORMAT:
        raise CheckpointError(f"{meta_path} is not a {FORMAT} store (format {fmt!r})")
    try:
        SignalSpec(**meta["spec"])
        shards = meta["shards"]
        total = sum(int(s["rows"]) for s in shards)
    except (KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{meta_path} is incomplete or invalid ({type(e).__name__}: {e})") from e
    if total != meta.get("n_rows"):
        raise CheckpointError(f"{meta_path} lists shards with {total} rows but n_rows={meta.get('n_rows')}")
    for s in shards:
        f = root / s["file"]
        if not f.is_file():
            raise CheckpointError(f"teacher-signal shard {f} is missing; rebuild the store")
        if f.stat().st_size != s["bytes"]:
            raise CheckpointError(f"teacher-signal shard {f} has {f.stat().st_size} bytes, {s['bytes']} were written "
                                  "(truncated or replaced); rebuild the store")
        try:
            rows = pq.read_metadata(f).num_rows
        except Exception as e:
            raise CheckpointError(f"teacher-signal shard {f} has a corrupt Parquet footer ({e})") from e
        if rows != s["rows"]:
            raise CheckpointError(f"teacher-signal shard {f} holds {rows} rows, {s['rows']} were written")
    if verify:
        _verify_shards(root, shards)
    if tokenizer is not None:
        fp = tokenizer_fingerprint(tokenizer)
        if fp != meta["tokenizer_fingerprint"]:
            raise TokenizerMismatchError(
                f"the teacher-signal store {root} was made with the tokenizer of fingerprint "
                f"{meta['tokenizer_fingerprint']} ({meta.get('tokenizer_size', '?')} tokens), but this tokenizer has "
                f"fingerprint {fp} ({len(tokenizer)} tokens): its token ids would be read against another "
                "vocabulary. Use the teacher's tokenizer or rebuild the store with this one.")
    return SignalStore(root, meta, streaming=streaming, cache_dir=cache_dir)


# ------------------------------------------------------------------ loss


def _aligned(student_logits: Tensor, batch: dict, positions: int) -> Tensor:
    """Student logits at the signal's positions: [B, L, V] are shifted here, [B, L-1, V] taken as they are."""
    if student_logits.ndim != 3:
        raise ShapeMismatchError(f"student logits must be [B, L, V], got {tuple(student_logits.shape)}")
    if student_logits.shape[1] == positions + 1:
        student_logits = student_logits[:, :-1]
    elif student_logits.shape[1] != positions:
        raise ShapeMismatchError(f"student logits cover {student_logits.shape[1]} positions; the stored signal has "
                                 f"{positions} (blocks of {positions + 1} tokens)")
    if student_logits.shape[-1] != batch["vocab_size"]:
        raise ShapeMismatchError(f"student vocabulary {student_logits.shape[-1]} differs from the stored teacher's "
                                 f"{batch['vocab_size']} (a tokenizer mismatch?)")
    return student_logits


def batch_signal(batch: dict, *, tail: str = "uniform", tokenizer: str | None = None) -> TeacherSignal:
    """A store batch as its typed `TeacherSignal` at the stored positions [B, P]: dense log-probs as `DenseLogits`
    (exact at any loss T), top-k as `TopK` (with `tail`), sampled as `Sampled`, each at the stored temperature."""
    kind, T0 = batch["kind"], float(batch["temperature"])
    if kind == "dense":
        return DenseLogits.from_logprobs(batch["logprobs"], T0, tokenizer)
    if kind == "topk":
        return TopK(temperature=T0, tokenizer=tokenizer, indices=batch["indices"], logprobs=batch["logprobs"],
                    tail=tail)
    if kind == "sampled":
        return Sampled(temperature=T0, tokenizer=tokenizer, indices=batch["indices"], logprobs=batch["logprobs"],
                       counts=batch["counts"], ratios=batch.get("ratios"), samples=int(batch["samples"]))
    raise ConfigError(f"unknown signal kind {kind!r}; choose one of {', '.join(KINDS)}")


def signal_kd_loss(student_logits: Tensor, batch: dict, *, divergence: str = "fkl", T: float = 1.0,
                   beta: float = 0.5, skew: float = 0.1, topk_mode: str = "densify", fill: str = "uniform",
                   ignore_index: int = -100, weights: Tensor | None = None) -> Tensor:
    """Token KD of `student_logits` ([B, L, V], or already shifted [B, L-1, V]) against a stored signal batch:
    `kdkit.losses.token.signal_kd_loss` of its `batch_signal`, the same loss a live teacher gets.

    dense: any divergence and any T (re-tempering a full distribution is exact). topk: ``topk_mode="densify"``
    completes the row with `sparse_to_dense_logprobs(fill)`; ``"support"`` is forward KL summed over the stored
    ids only (DistillKit's "missing mass is zero"). sampled: the RS-KD estimate sum_i w_i (log p_i - log s_i) of
    forward KL, unbiased in value and gradient. Sparse signals are only defined at the temperature they were
    stored at: another T is refused. Scaled by T^2 and averaged over counted tokens like `token_kd_loss`.
    """
    if topk_mode not in ("densify", "support"):
        raise ConfigError(f"topk_mode must be 'densify' or 'support', got {topk_mode!r}")
    div = Divergence(divergence, T, beta, skew)
    positions = batch["logprobs"].shape[1]
    s = _aligned(student_logits, batch, positions)
    labels = batch.get("labels")
    y = None if labels is None else labels[:, 1:].to(s.device)
    signal = batch_signal(batch, tail="support" if topk_mode == "support" else fill).to(s.device)
    return token_signal_kd_loss(s, signal, y, div=div, ignore_index=ignore_index, weights=weights)
