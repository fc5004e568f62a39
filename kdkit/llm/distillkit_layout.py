"""Export a kdkit top-k store as a DistillKit compressed-logit dataset, and import one (or DistillKit's raw top-k
rows) as a kdkit store: signals made by either tool train students in the other.

The layout, as DistillKit (arcee-ai, ``distillkit/compression``, ``sample_logits_vllm.py``) writes and reads it;
this is kdkit's own implementation of it. A folder holds ``compression_config.yaml`` (DistillKit's
DistributionQuantizationConfig, see `DistillKitCompression`) and Parquet files of rows:

  input_ids            list<uint64>         the tokens
  compressed_logprobs  list<list<uint8>>    per position: its k log-probs (descending), packed as below
  bytepacked_indices   list<list<uint8>>    per position: its k ids at ceil(log2 d) bits each, MSB first

Position t is the teacher's prediction of token t+1 (vLLM prompt log-probs without the first token), as in a kdkit
store; DistillKit's packing step may cut input_ids to as many tokens as positions, which import undoes by
dropping the last position. A position's log-prob bytes, in order (floats little-endian): with
``delta_encoding`` the values v are first replaced by (v_0, v_1 - v_0, ...); the first ``exact_k`` values in
``exact_dtype``; with ``polynomial_terms`` the coefficients (``term_dtype``) of a least-squares fit of the other
k - exact_k values over the terms (t^i, sqrt(t), exp(t) at t = 0, 1, ...; t in [0, 1] with ``normalize_t``);
then per residual bin its scale (``scale_dtype``: max |residual| / 2^(b-1)) and its residuals as b-bit codes
round(r / scale) + 2^(b-1) (b = 1: the sign), MSB first, padded to a byte. Values past the bins are the fit alone.

DistillKit's layout has no temperature, tokenizer identity or labels: its dataset teacher reads every signal as
made at temperature 1, so only such stores are exported, and a ``kdkit_signal.json`` beside the data keeps the
store's metadata (tokenizer fingerprint, chat-template hash, vocabulary size, teacher), which import checks.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import Tensor

from ..errors import CheckpointError, ConfigError, TokenizerMismatchError
from .tokenizers import tokenizer_fingerprint

CONFIG_FILE = "compression_config.yaml"
SIDECAR = "kdkit_signal.json"
SIDECAR_FORMAT = "kdkit-distillkit-export/1"
FLOAT_DTYPES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
SPECIAL_TERMS = ("sqrt", "exp")


@dataclass(frozen=True)
class ResidualBin:
    scale_dtype: str
    element_bits: int
    num_elements: int


@dataclass(frozen=True)
class DistillKitCompression:
    """DistillKit's DistributionQuantizationConfig: how each position's k log-probs are packed (module docstring),
    with DistillKit's defaults. A store's export defaults to every value exact in float16 (no deltas), like kdkit's
    plain top-k layout."""

    d: int                              # vocabulary size: ids take ceil(log2 d) bits
    k: int
    exact_k: int
    exact_dtype: str = "float32"
    polynomial_terms: tuple = ()        # ints (powers of t) and "sqrt" / "exp"
    term_dtype: str = "float32"
    residual_bins: tuple[ResidualBin, ...] = ()
    delta_encoding: bool = True
    error_diffusion: bool = False       # an encoding choice only; decoding is the same, export does not do it
    normalize_t: bool = False

    def __post_init__(self):
        at = CONFIG_FILE
        if not (isinstance(self.d, int) and self.d >= 2):
            raise ConfigError(f"{at}: d must be the vocabulary size (an integer >= 2), got {self.d!r}")
        if not (isinstance(self.k, int) and 1 <= self.k <= self.d):
            raise ConfigError(f"{at}: k must be an integer from 1 to d={self.d}, got {self.k!r}")
        if not (isinstance(self.exact_k, int) and 0 <= self.exact_k <= self.k):
            raise ConfigError(f"{at}: exact_k must be an integer from 0 to k={self.k}, got {self.exact_k!r}")
        dtypes = {"exact_dtype": self.exact_dtype, "term_dtype": self.term_dtype,
                  **{f"residual_bins.{i}.scale_dtype": b.scale_dtype for i, b in enumerate(self.residual_bins)}}
        for key, value in dtypes.items():
            if value not in FLOAT_DTYPES:
                raise ConfigError(f"{at}: {key} must be one of {', '.join(FLOAT_DTYPES)}, got {value!r}")
        for t in self.polynomial_terms:
            if not (t in SPECIAL_TERMS or (isinstance(t, int) and not isinstance(t, bool) and t >= 0)):
                raise ConfigError(f"{at}: polynomial_terms holds powers (integers >= 0) and 'sqrt' or 'exp', got {t!r}")
        for i, b in enumerate(self.residual_bins):
            if not (isinstance(b.element_bits, int) and 1 <= b.element_bits <= 64):
                raise ConfigError(f"{at}: residual_bins.{i}.element_bits must be from 1 to 64, got {b.element_bits!r}")
            if not (isinstance(b.num_elements, int) and b.num_elements >= 1):
                raise ConfigError(f"{at}: residual_bins.{i}.num_elements must be >= 1, got {b.num_elements!r}")
        if sum(b.num_elements for b in self.residual_bins) > self.k - self.exact_k:
            raise ConfigError(f"{at}: residual_bins hold more than k - exact_k = {self.k - self.exact_k} values")
        if self.exact_k < self.k and not self.polynomial_terms and not self.residual_bins:
            raise ConfigError(f"{at}: exact_k={self.exact_k} < k={self.k} needs polynomial_terms or residual_bins "
                              "for the other values")

    @classmethod
    def from_dict(cls, raw: dict) -> "DistillKitCompression":
        if not isinstance(raw, dict):
            raise ConfigError(f"{CONFIG_FILE} must be a mapping of DistillKit's compression settings")
        allowed = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise ConfigError(f"{CONFIG_FILE}: unknown key {unknown[0]!r}; keys: {', '.join(sorted(allowed))}")
        if "d" not in raw or "k" not in raw or "exact_k" not in raw:
            raise ConfigError(f"{CONFIG_FILE} needs d, k and exact_k")
        bins = []
        for i, b in enumerate(raw.get("residual_bins") or []):
            if not isinstance(b, dict) or set(b) != {"scale_dtype", "element_bits", "num_elements"}:
                raise ConfigError(f"{CONFIG_FILE}: residual_bins.{i} must have scale_dtype, element_bits and "
                                  f"num_elements, got {b!r}")
            bins.append(ResidualBin(**b))
        return cls(**{**raw, "polynomial_terms": tuple(raw.get("polynomial_terms") or ()),
                      "residual_bins": tuple(bins)})

    def to_dict(self) -> dict:
        out = asdict(self)
        out["polynomial_terms"] = list(self.polynomial_terms) or None
        out["residual_bins"] = [asdict(b) for b in self.residual_bins]
        return out

    @property
    def index_bits(self) -> int:
        return math.ceil(math.log2(self.d))

    def logprob_bytes(self) -> int:
        n = self.exact_k * FLOAT_DTYPES[self.exact_dtype] + len(self.polynomial_terms) * FLOAT_DTYPES[self.term_dtype]
        return n + sum(FLOAT_DTYPES[b.scale_dtype] + -(-b.element_bits * b.num_elements // 8)
                       for b in self.residual_bins)

    def bytes_per_position(self) -> int:
        """The packed payload of one position: log-probs plus ids (what DistillKit's bytes/token figures count)."""
        return self.logprob_bytes() + -(-self.k * self.index_bits // 8)


# ------------------------------------------------------------------ bits and floats


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Non-negative integers [..., n] as a big-endian bit stream of `bits` bits each: uint8 [..., ceil(n*bits/8)]."""
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    stream = ((values.astype(np.uint64)[..., None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(stream.reshape(*values.shape[:-1], -1), axis=-1)


def unpack_bits(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """The inverse of `pack_bits`: int64 [..., n]."""
    stream = np.unpackbits(packed, axis=-1)[..., : n * bits].reshape(*packed.shape[:-1], n, bits)
    return (stream.astype(np.uint64) << np.arange(bits - 1, -1, -1, dtype=np.uint64)).sum(-1).astype(np.int64)


def _to_bytes(x: np.ndarray, dtype: str) -> np.ndarray:
    """Float64 values [..., n] rounded to `dtype`, as little-endian bytes [..., n * width]."""
    if x.shape[-1] == 0:
        return np.zeros(x.shape, np.uint8)
    if dtype == "bfloat16":
        raw = torch.from_numpy(np.ascontiguousarray(x, np.float32)).bfloat16().view(torch.int16).numpy()
        return raw.astype("<i2").view(np.uint8).reshape(*x.shape[:-1], -1)
    return np.ascontiguousarray(x, {"float16": "<f2", "float32": "<f4", "float64": "<f8"}[dtype]).view(
        np.uint8).reshape(*x.shape[:-1], -1)


def _from_bytes(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Little-endian bytes [..., n * width] as float64 [..., n]."""
    raw = np.ascontiguousarray(raw)
    if raw.shape[-1] == 0:
        return np.zeros(raw.shape, np.float64)
    if dtype == "bfloat16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return raw.view({"float16": "<f2", "float32": "<f4", "float64": "<f8"}[dtype]).astype(np.float64)


def _rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    return _from_bytes(_to_bytes(x, dtype), dtype)


def _design(cfg: DistillKitCompression) -> np.ndarray:
    """The fit's terms at t = 0..m-1 (or m points in [0, 1]) for the m = k - exact_k approximated values: [m, terms]."""
    m = cfg.k - cfg.exact_k
    t = np.linspace(0.0, 1.0, m) if cfg.normalize_t else np.arange(m, dtype=np.float64)
    cols = [np.sqrt(t) if term == "sqrt" else np.exp(t) if term == "exp" else t ** term
            for term in cfg.polynomial_terms]
    return np.stack(cols, axis=-1) if cols else np.zeros((m, 0))


# ------------------------------------------------------------------ one position's log-probs


def encode_logprobs(values: np.ndarray, cfg: DistillKitCompression) -> np.ndarray:
    """Descending log-probs [N, k] as DistillKit's bytes [N, cfg.logprob_bytes()]."""
    if cfg.error_diffusion:
        raise ConfigError(f"{CONFIG_FILE}: error_diffusion=true is not written by kdkit's export (DistillKit "
                          "itself does not recommend it); set it to false")
    x = np.asarray(values, np.float64)
    if cfg.delta_encoding:
        x = np.concatenate([x[:, :1], np.diff(x, axis=-1)], axis=-1)
    parts = [_to_bytes(x[:, : cfg.exact_k], cfg.exact_dtype)]
    rest = x[:, cfg.exact_k: cfg.k]
    if cfg.polynomial_terms:
        X = _design(cfg)
        coeffs = _rounded(rest @ np.linalg.pinv(X).T, cfg.term_dtype)  # least squares, one design for all rows
        parts.append(_to_bytes(coeffs, cfg.term_dtype))
        rest = rest - coeffs @ X.T
    at = 0
    for b in cfg.residual_bins:
        r = rest[:, at: at + b.num_elements]
        top = 1.0 if b.element_bits == 1 else float(2 ** (b.element_bits - 1))
        scale = np.abs(r).max(-1, keepdims=True) / top
        scale = _rounded(np.where(scale == 0, 1.0, scale), b.scale_dtype)
        if b.element_bits == 1:
            codes = (r > 0).astype(np.int64)  # decodes to +scale or -scale
        else:
            codes = np.clip(np.round(r / scale), -top, top - 1).astype(np.int64) + int(top)
        parts += [_to_bytes(scale, b.scale_dtype), pack_bits(codes, b.element_bits)]
        at += b.num_elements
    return np.concatenate(parts, axis=-1)


def decode_logprobs(raw: np.ndarray, cfg: DistillKitCompression) -> np.ndarray:
    """DistillKit's bytes [N, cfg.logprob_bytes()] as log-probs [N, k] (float64)."""
    if raw.shape[-1] != cfg.logprob_bytes():
        raise CheckpointError(f"compressed_logprobs hold {raw.shape[-1]} bytes per position; {CONFIG_FILE} says "
                              f"{cfg.logprob_bytes()}: the data and its config do not belong together")
    at = 0

    def take(n: int) -> np.ndarray:
        nonlocal at
        at += n
        return raw[:, at - n: at]

    exact = _from_bytes(take(cfg.exact_k * FLOAT_DTYPES[cfg.exact_dtype]), cfg.exact_dtype)
    m = cfg.k - cfg.exact_k
    rest = np.zeros((len(raw), m))
    if cfg.polynomial_terms:
        coeffs = _from_bytes(take(len(cfg.polynomial_terms) * FLOAT_DTYPES[cfg.term_dtype]), cfg.term_dtype)
        rest += coeffs @ _design(cfg).T
    j = 0
    for b in cfg.residual_bins:
        scale = _from_bytes(take(FLOAT_DTYPES[b.scale_dtype]), b.scale_dtype)
        codes = unpack_bits(take(-(-b.element_bits * b.num_elements // 8)), b.element_bits, b.num_elements)
        r = (2 * codes - 1) * scale if b.element_bits == 1 else (codes - 2 ** (b.element_bits - 1)) * scale
        rest[:, j: j + b.num_elements] += r
        j += b.num_elements
    x = np.concatenate([exact, rest], axis=-1)
    return np.cumsum(x, axis=-1) if cfg.delta_encoding else x


# ------------------------------------------------------------------ export


def export_distillkit(store, out_dir, config: DistillKitCompression | dict | None = None, *,
                      rows_per_file: int = 256, overwrite: bool = False) -> Path:
    """Write a top-k store (a path or an open `SignalStore`; plain or compact) as a DistillKit compressed dataset
    in `out_dir`: data_<i>.parquet, compression_config.yaml and kdkit_signal.json. `config` (default: every value
    exact in float16) may approximate the values: DistillKit's budget and recommended settings are both written.
    The positions' labels are not carried (DistillKit's layout has none)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from .signal_store import SignalStore, open_signal_store

    st = store if isinstance(store, SignalStore) else open_signal_store(store)
    if st.kind != "topk":
        raise ConfigError(f"DistillKit's layout holds top-k signals; the store {st.path} is {st.kind!r}")
    if st.spec.temperature != 1.0:
        raise ConfigError(f"DistillKit's dataset teacher reads signals as made at temperature 1 (its layout has no "
                          f"temperature); the store {st.path} was made at temperature {st.spec.temperature}: export a "
                          "store made at temperature 1")
    if rows_per_file < 1:
        raise ConfigError(f"rows_per_file must be >= 1, got {rows_per_file}")
    cfg = (config if isinstance(config, DistillKitCompression) else
           DistillKitCompression.from_dict(config) if config is not None else
           DistillKitCompression(d=st.vocab_size, k=st.spec.k, exact_k=st.spec.k, exact_dtype="float16",
                                 delta_encoding=False))
    if cfg.d < st.vocab_size or cfg.k > st.spec.k:
        raise ConfigError(f"{CONFIG_FILE}: d={cfg.d} and k={cfg.k} must cover the store's vocabulary "
                          f"({st.vocab_size}) with at most its k={st.spec.k} ids")
    out = _fresh_folder(out_dir, overwrite)
    schema = pa.schema([("input_ids", pa.list_(pa.uint64())),
                        ("compressed_logprobs", pa.list_(pa.list_(pa.uint8()))),
                        ("bytepacked_indices", pa.list_(pa.list_(pa.uint8())))])
    P = st.positions
    for i, batch in enumerate(st.batches(rows_per_file)):
        B = batch["input_ids"].shape[0]
        ids = batch["indices"][..., : cfg.k].reshape(B * P, cfg.k).numpy()
        vals = batch["logprobs"][..., : cfg.k].reshape(B * P, cfg.k).double().numpy()
        columns = [_nested(batch["input_ids"].numpy().astype(np.uint64)),
                   _nested(encode_logprobs(vals, cfg).reshape(B, P, -1)),
                   _nested(pack_bits(ids, cfg.index_bits).reshape(B, P, -1))]
        pq.write_table(pa.Table.from_arrays(columns, schema=schema), out / f"data_{i}.parquet", compression="zstd")
    (out / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    meta = {key: st.meta.get(key) for key in ("tokenizer_fingerprint", "tokenizer_size", "chat_template_sha256",
                                              "teacher", "vocab_size", "block_size")}
    (out / SIDECAR).write_text(json.dumps({"format": SIDECAR_FORMAT, "temperature": st.spec.temperature,
                                           "source": str(st.path), **meta}, indent=2))
    return out


def _nested(x: np.ndarray):
    """[rows, n] or [rows, n, m] as Arrow list (of list) arrays, the variable-length lists DistillKit writes."""
    import pyarrow as pa

    def lists(values, rows, width):
        return pa.ListArray.from_arrays(pa.array(np.arange(rows + 1, dtype=np.int32) * width), values)

    flat = pa.array(np.ascontiguousarray(x).reshape(-1))
    if x.ndim == 2:
        return lists(flat, x.shape[0], x.shape[1])
    return lists(lists(flat, x.shape[0] * x.shape[1], x.shape[2]), x.shape[0], x.shape[1])


def _fresh_folder(out_dir, overwrite: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out} is not empty; pass overwrite=True or choose another folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


# ------------------------------------------------------------------ import


@dataclass
class DistillKitRows:
    """A DistillKit dataset read back: token blocks [n, L] and their top-k ids and log-probs [n, L-1, k]."""

    blocks: Tensor
    indices: Tensor
    logprobs: Tensor
    vocab_size: int
    temperature: float = 1.0
    sidecar: dict = field(default_factory=dict)


def read_distillkit(path, vocab_size: int | None = None) -> DistillKitRows:
    """Read a DistillKit folder: compressed rows (with compression_config.yaml) or raw top-k rows (``token_ids``,
    ``top_values``). Every row must have the same length: a kdkit store holds blocks of one size."""
    import pyarrow.parquet as pq
    import yaml

    root = Path(path)
    files = sorted(root.glob("*.parquet"), key=lambda f: (len(f.name), f.name))  # data_2 before data_10
    if not files:
        raise CheckpointError(f"no Parquet files in {root}: not a DistillKit dataset folder")
    sidecar = json.loads((root / SIDECAR).read_text()) if (root / SIDECAR).is_file() else {}
    cfg = None
    if (root / CONFIG_FILE).is_file():
        cfg = DistillKitCompression.from_dict(yaml.safe_load((root / CONFIG_FILE).read_text()))
    blocks, ids, vals = [], [], []
    for f in files:
        table = pq.read_table(f)
        names = set(table.column_names)
        tokens = _fixed(table, "input_ids", f).astype(np.int64)
        if {"compressed_logprobs", "bytepacked_indices"} <= names:
            if cfg is None:
                raise CheckpointError(f"{root} holds compressed rows but no {CONFIG_FILE} saying how they are packed")
            raw, packed = _fixed(table, "compressed_logprobs", f), _fixed(table, "bytepacked_indices", f)
            v = decode_logprobs(raw.reshape(-1, raw.shape[-1]), cfg).reshape(*raw.shape[:2], cfg.k)
            i = unpack_bits(packed, cfg.index_bits, cfg.k)
        elif {"token_ids", "top_values"} <= names:
            i, v = _fixed(table, "token_ids", f).astype(np.int64), _fixed(table, "top_values", f).astype(np.float64)
        else:
            raise CheckpointError(f"{f}: rows need compressed_logprobs and bytepacked_indices (or token_ids and "
                                  f"top_values), found {', '.join(sorted(names))}")
        if i.shape[1] == tokens.shape[1]:  # cut to as many tokens as positions by DistillKit's packing
            i, v = i[:, :-1], v[:, :-1]
        if i.shape[1] != tokens.shape[1] - 1:
            raise CheckpointError(f"{f}: rows of {tokens.shape[1]} tokens have {i.shape[1]} positions; expected "
                                  f"{tokens.shape[1] - 1} (position t predicts token t+1)")
        blocks.append(tokens), ids.append(i), vals.append(v)
    if len({b.shape[1] for b in blocks}) > 1:
        raise ConfigError(f"{root}: files hold rows of different lengths; a kdkit store holds blocks of one length: "
                          "pack the rows to one length first")
    V = int(vocab_size or sidecar.get("vocab_size") or (cfg.d if cfg else 0))
    if V < 2:
        raise ConfigError(f"{root}: the vocabulary size is unknown (no {CONFIG_FILE}); pass vocab_size")
    out = DistillKitRows(torch.from_numpy(np.concatenate(blocks)), torch.from_numpy(np.concatenate(ids)),
                         torch.from_numpy(np.concatenate(vals)).float(), V, float(sidecar.get("temperature", 1.0)),
                         sidecar)
    top = max(int(out.indices.max()), int(out.blocks.max()))
    if top >= V:
        raise CheckpointError(f"{root}: ids reach {top}, outside the vocabulary of {V}")
    return out


def _fixed(table, name: str, where: Path) -> np.ndarray:
    """A list (of lists) column as numpy [rows, n(, m)]; rows or positions of different lengths are refused."""
    col = table.column(name).combine_chunks()
    shape = [len(col)]
    while hasattr(col, "offsets"):
        widths = np.diff(col.offsets.to_numpy())
        if len(widths) and (widths != widths[0]).any():
            raise ConfigError(f"{where}: {name} lists have {len(set(widths.tolist()))} lengths ({widths.min()} to "
                              f"{widths.max()}); a kdkit store holds blocks of one length: pack the rows to one "
                              "length first")
        shape.append(int(widths[0]) if len(widths) else 0)
        col = col.flatten()
    return col.to_numpy(zero_copy_only=False).reshape(shape)


class ReplayTeacher(torch.nn.Module):
    """A 'teacher' whose logits at each stored block are its stored top-k signal, the rest of the vocabulary
    sharing the missing mass evenly (times the temperature, so that the writer's softmax(logits / T) gives the
    stored distribution back). Importing is running it through `write_signal_store`: the same codecs, metadata,
    shards and checks as a live teacher. Memory: one [batch, L, V] float32 tensor per call."""

    def __init__(self, rows: DistillKitRows, name: str):
        super().__init__()
        self.rows, self.name_or_path = rows, name
        self.config = SimpleNamespace(vocab_size=rows.vocab_size)
        self._row = {rows.blocks[i].numpy().tobytes(): i for i in reversed(range(len(rows.blocks)))}

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None):
        which = [self._row[b.numpy().tobytes()] for b in input_ids.cpu().long()]
        ids, vals = self.rows.indices[which], self.rows.logprobs[which].double()
        V, k = self.rows.vocab_size, ids.shape[-1]
        rest = (1.0 - vals.exp().sum(-1, keepdim=True)).clamp(min=0.0) / max(V - k, 1)
        logp = rest.log().expand(*ids.shape[:-1], V).clone().scatter_(-1, ids, vals)
        logp = torch.cat([logp, torch.zeros_like(logp[:, :1])], dim=1)  # the last token predicts nothing stored
        return SimpleNamespace(logits=(logp * self.rows.temperature).float())


def import_distillkit(path, out_dir, tokenizer, spec=None, *, vocab_size: int | None = None, batch_size: int = 1,
                      progress: bool = False, overwrite: bool = False) -> Path:
    """A DistillKit dataset folder as a kdkit store in `out_dir` (default spec: plain top-k with the dataset's k).
    `tokenizer` is the teacher's; a kdkit_signal.json beside the data (written by `export_distillkit`) must name
    the same tokenizer. Labels count every position (DistillKit's layout has none)."""
    from .signal_store import SignalSpec, write_signal_store

    rows = read_distillkit(path, vocab_size)
    fp = rows.sidecar.get("tokenizer_fingerprint")
    if fp is not None and fp != tokenizer_fingerprint(tokenizer):
        raise TokenizerMismatchError(f"{path} was exported from a store made with the tokenizer of fingerprint {fp}; "
                                     f"this tokenizer has {tokenizer_fingerprint(tokenizer)}")
    k = rows.indices.shape[-1]
    spec = spec or SignalSpec("topk", k=k, temperature=rows.temperature)
    if spec.kind != "topk" or spec.k > k:
        raise ConfigError(f"a DistillKit dataset holds top-{k} signals: import it as kind=topk with k <= {k}, got "
                          f"kind={spec.kind!r}, k={spec.k}")
    if spec.temperature != rows.temperature:
        raise ConfigError(f"the signal in {path} was made at temperature {rows.temperature}; a sparse signal cannot "
                          f"be re-tempered, so import it with temperature={rows.temperature} (got {spec.temperature})")
    teacher = ReplayTeacher(rows, f"distillkit:{Path(path).resolve()}")
    return write_signal_store(teacher, rows.blocks, out_dir, spec, tokenizer, batch_size=batch_size,
                              progress=progress, overwrite=overwrite)
