"""`kdkit bench signal-compression`: bytes per token against reconstruction KL for each way of storing a teacher's
top-k signal, on a real teacher over GSM8K text.

Why this measure: a stored signal is only as good as the distribution the loss rebuilds from it. For each layout
the teacher's signal is written as a store (or exported to DistillKit's layout) and read back the way training
reads it; p_rec is the full distribution the loss trains on (`sparse_to_dense_logprobs`, uniform tail), and the
score is KL(p_teacher || p_rec) per position, averaged. Where the stored values claim all of the mass (1 - sum
of the rounded top-k <= 0) p_rec gives the tail nothing and the KL is infinite: those positions are counted, and
the mean is over the positions every kdkit layout reconstructs finitely. Bytes: the shards on disk over stored
positions (all columns, and the signal's columns alone from the Parquet footers), and the payload before
Parquet's encodings and zstd.

The teacher runs once; every layout is written from its cached log-probs by a replaying teacher, so the layouts
see identical signals.
"""
from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor

from ..config import PositiveInt, bad_value
from ..llm.signal_codec import MAX_BITS
from .results import RESULTS_DIR, bench_options, int_list, read_results, write_result

KIND = "signal-compression"
MARKDOWN = RESULTS_DIR.parent / "signal-compression.md"
BUDGET_BYTES = 150  # the goal: at most this many bytes per token on disk at k = 64 ...
BASELINE = "topk-32-bf16"  # ... with a reconstruction KL no worse than plain top-32 in bf16
DISTILLKIT_README = "https://github.com/arcee-ai/DistillKit#logit-compression"
# DistillKit's two recommended settings (README, "Logit Compression"), written here by kdkit's own exporter
DISTILLKIT_CONFIGS = {
    "distillkit-recommended": {"k": 128, "exact_k": 16, "exact_dtype": "bfloat16",
                               "polynomial_terms": [0, 1, 2, 3, 4, "sqrt"], "term_dtype": "float32",
                               "residual_bins": [], "delta_encoding": False, "error_diffusion": False},
    "distillkit-budget": {"k": 50, "exact_k": 1, "exact_dtype": "bfloat16", "polynomial_terms": [0, 1, "sqrt"],
                          "term_dtype": "float32", "residual_bins": [], "delta_encoding": False,
                          "error_diffusion": False},
}
# the figures DistillKit's README publishes for them (bytes per token, its own teachers' vocabularies)
DISTILLKIT_PUBLISHED = {"distillkit-recommended": "~300", "distillkit-budget": "~114"}


@dataclass
class SignalCompressionOptions:
    """`kdkit bench signal-compression [key=value ...]`."""

    teacher: str = "smollm2-135m-instruct"
    blocks: PositiveInt = 64            # GSM8K train text blocks
    block_size: PositiveInt = 256
    k: PositiveInt = 64                 # the compact codec's k (the goal's)
    bits: str = "3,4,5,6,8"             # compact codes to measure
    threads: PositiveInt = 1
    out: str | None = None              # result folder (default: leaderboards/results/signal-compression + table)

    def validate(self, at: str) -> None:
        if any(not 2 <= b <= MAX_BITS for b in int_list(self.bits, f"{at}bits")):
            raise bad_value(f"{at}bits", self.bits, f"a comma list of integers from 2 to {MAX_BITS} (compact codes)")


class _Replay(torch.nn.Module):
    """The teacher's cached log-probs [n, L-1, V] served as logits for the store writer."""

    def __init__(self, blocks: torch.Tensor, logprobs: torch.Tensor, name: str):
        super().__init__()
        self.logprobs, self.name_or_path, self.config = logprobs, name, SimpleNamespace(vocab_size=logprobs.shape[-1])
        self._row = {b.numpy().tobytes(): i for i, b in enumerate(blocks)}

    def forward(self, input_ids, attention_mask=None):
        lp = self.logprobs[[self._row[b.numpy().tobytes()] for b in input_ids.cpu()]]
        return SimpleNamespace(logits=torch.cat([lp, torch.zeros_like(lp[:, :1])], dim=1))


def teacher_logprobs(model, blocks: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """log softmax of the teacher's logits at each block's first L-1 positions, float32 [n, L-1, V]."""
    parts = []
    with torch.inference_mode():
        for i in range(0, len(blocks), batch_size):
            parts.append(torch.log_softmax(model(input_ids=blocks[i:i + batch_size]).logits[:, :-1].float(), -1))
    return torch.cat(parts)


class ReconstructionKL:
    """KL(p || p_rec) per position for teacher log-probs p [N, V] and top-k signals [N, k], where p_rec is the
    signal densified as the loss densifies it (`sparse_to_dense_logprobs(fill="uniform")`: the stored values at
    their ids, the float32 rest 1 - sum(exp(values)), clamped at 0, spread evenly over the other V - k ids).
    In closed form, exact to float64 rounding: with K the kept ids and u the tail's share,
    KL = sum_K p (log p - v) + sum_{not K} p log p - (sum_{not K} p) log u,
    so each layout costs a gather of k entries, the sums over V being taken once (inf where u = 0 and p's tail
    is not)."""

    def __init__(self, logprobs: Tensor, chunk: int = 512):
        self.logprobs, self.vocab_size = logprobs, logprobs.shape[-1]
        sums = []
        for a in range(0, len(logprobs), chunk):
            lp = logprobs[a:a + chunk].double()
            p = lp.exp()
            sums.append(torch.stack([p.sum(-1), torch.where(p > 0, p * lp, 0.0).sum(-1)], -1))
        self.mass, self.neg_entropy = torch.cat(sums).unbind(-1)

    def __call__(self, indices: Tensor, values: Tensor) -> Tensor:
        lp = self.logprobs.gather(-1, indices.long()).double()
        p = lp.exp()
        stored = values.float()
        rest = (1.0 - stored.exp().sum(-1)).clamp(min=0.0).double()
        log_u = rest.log() - math.log(self.vocab_size - indices.shape[-1])
        tail = (self.mass - p.sum(-1)).clamp(min=0.0)
        head = torch.where(p > 0, p * (lp - stored.double()), 0.0).sum(-1)
        return head + (self.neg_entropy - (p * lp).sum(-1)) - torch.where(tail > 0, tail * log_u, 0.0)


def column_disk_bytes(files: list[Path], columns: set[str]) -> int:
    """Bytes the named columns take on disk (compressed column chunks, from the Parquet footers)."""
    import pyarrow.parquet as pq

    total = 0
    for f in files:
        md = pq.ParquetFile(f).metadata
        for g in range(md.num_row_groups):
            for c in range(md.num_columns):
                col = md.row_group(g).column(c)
                if col.path_in_schema.split(".")[0] in columns:
                    total += col.total_compressed_size
    return total


def _store_row(name: str, path: Path, kl_of: ReconstructionKL, positions: int) -> tuple[dict, Tensor]:
    from ..llm.signal_store import open_signal_store

    store = open_signal_store(path)
    got = [(b["indices"], b["logprobs"]) for b in store.batches(8)]
    ids = torch.cat([i for i, _ in got]).flatten(0, 1)
    vals = torch.cat([v for _, v in got]).flatten(0, 1)
    kl = kl_of(ids, vals)
    signal = set(store.cols) - {"row", "input_ids", "labels"}
    spec = store.spec
    row = {"name": name, "layout": "kdkit store", "k": spec.k, "codec": spec.codec,
           "values": f"{spec.bits}-bit codes" if spec.codec == "compact" else spec.dtype,
           "disk_bytes_per_token": store.meta["bytes"] / positions,
           "signal_disk_bytes_per_token": column_disk_bytes(store.files, signal) / positions,
           "payload_bytes_per_token": store.meta["payload_bytes_per_token"]}
    return row, kl


def _distillkit_row(name: str, source: Path, config: dict, tmp: Path, kl_of: ReconstructionKL,
                    positions: int) -> tuple[dict, Tensor]:
    from ..llm.distillkit_layout import DistillKitCompression, export_distillkit, read_distillkit

    cfg = DistillKitCompression.from_dict({"d": kl_of.vocab_size, **config})
    out = export_distillkit(source, tmp / name, cfg)
    rows = read_distillkit(out)
    kl = kl_of(rows.indices.flatten(0, 1), rows.logprobs.flatten(0, 1))
    files = sorted(out.glob("*.parquet"))
    row = {"name": name, "layout": "DistillKit (kdkit export)", "k": cfg.k, "codec": "polynomial",
           "values": f"{cfg.exact_k} exact {cfg.exact_dtype}, terms {list(cfg.polynomial_terms)}",
           "disk_bytes_per_token": sum(f.stat().st_size for f in files) / positions,
           "signal_disk_bytes_per_token": column_disk_bytes(files, {"compressed_logprobs", "bytepacked_indices"})
           / positions,
           "payload_bytes_per_token": float(cfg.bytes_per_position()), "published": DISTILLKIT_PUBLISHED[name]}
    return row, kl


def run_signal_compression(settings: list[str]) -> Path:
    """Run the teacher once over GSM8K blocks, write and read back every layout, write the result and the table."""
    from ..llm.models import load_causal_lm
    from ..llm.signal_store import SignalSpec, write_signal_store
    from ..llm.text_data import load_texts, pack_blocks

    opts = bench_options(SignalCompressionOptions, settings)
    bits = int_list(opts.bits, "bits")
    torch.set_num_threads(opts.threads)
    t0 = time.perf_counter()
    model, tok = load_causal_lm(opts.teacher)
    texts = load_texts("gsm8k", "train", limit=max(64, opts.blocks * opts.block_size // 40))
    blocks = pack_blocks(texts, tok, opts.block_size)[: opts.blocks]
    logprobs = teacher_logprobs(model, blocks)
    teacher_seconds = time.perf_counter() - t0
    del model
    flat = logprobs.flatten(0, 1)
    positions = flat.shape[0]
    replay, kl_of = _Replay(blocks, logprobs, opts.teacher), ReconstructionKL(flat)
    specs = {"topk-32-bf16": SignalSpec("topk", k=32, dtype="bfloat16"),
             "topk-64-fp16": SignalSpec("topk", k=64),
             **{f"compact-{opts.k}-{b}bit": SignalSpec("topk", k=opts.k, codec="compact", bits=b) for b in bits},
             "compact-128-4bit": SignalSpec("topk", k=128, codec="compact", bits=4),
             "topk-128-fp32": SignalSpec("topk", k=128, dtype="float32")}  # DistillKit's exports start from it
    rows, kls = [], {}
    with tempfile.TemporaryDirectory(prefix="kdkit-signal-compression-") as tmp:
        tmp = Path(tmp)
        for name, spec in specs.items():
            write_signal_store(replay, blocks, tmp / name, spec, tok, progress=False)
            row, kls[name] = _store_row(name, tmp / name, kl_of, positions)
            rows.append(row)
        for name, config in DISTILLKIT_CONFIGS.items():
            row, kls[name] = _distillkit_row(name, tmp / "topk-128-fp32", config, tmp, kl_of, positions)
            rows.append(row)
    v, i = flat.topk(opts.k, dim=-1)
    kls[f"exact-{opts.k}"] = kl_of(i, v)  # any k-entry layout with a uniform tail: the floor
    rows.append({"name": f"exact-{opts.k}", "layout": "no storage (float32 top-k)", "k": opts.k, "codec": "-",
                 "values": "float32, exact", "disk_bytes_per_token": None, "signal_disk_bytes_per_token": None,
                 "payload_bytes_per_token": None})
    # the positions every kdkit layout reconstructs finitely; a DistillKit row is averaged over those of them it
    # reconstructs finitely (its polynomial often claims more than all of the mass)
    common = torch.stack([torch.isfinite(kls[name]) for name in specs]).all(0)
    for row in rows:
        kl = kls[row["name"]]
        row["kl_mean"] = float(kl[common & torch.isfinite(kl)].mean())
        row["kl_positions"] = int((common & torch.isfinite(kl)).sum())
        row["infinite_kl_positions"] = int((~torch.isfinite(kl)).sum())
    record = {"teacher": opts.teacher, "data": "gsm8k train", "blocks": opts.blocks, "block_size": opts.block_size,
              "positions": positions, "common_positions": int(common.sum()), "vocab_size": flat.shape[-1],
              "threads": opts.threads, "teacher_seconds": teacher_seconds,
              "wall_seconds": time.perf_counter() - t0, "rows": rows}
    path = write_result(KIND, record, Path(opts.out) if opts.out else None)
    for row in rows:
        disk = "-" if row["disk_bytes_per_token"] is None else f"{row['disk_bytes_per_token']:.1f}"
        print(f"{row['name']:>24}: {disk:>6} B/token on disk, KL {row['kl_mean']:.4f} "
              f"({row['infinite_kl_positions']} infinite)")
    return write_markdown() if opts.out is None else path


def _fmt(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def write_markdown(directory: Path | None = None, path: Path | None = None) -> Path:
    """leaderboards/signal-compression.md from the newest result file."""
    results = read_results(KIND, directory)
    if not results:
        raise FileNotFoundError(f"no {KIND} results to tabulate")
    r = results[-1]
    rows = {row["name"]: row for row in r["rows"]}
    base = rows[BASELINE]
    hw = r["hardware"]
    lines = [
        "# Teacher-signal storage: bytes per token against reconstruction KL",
        "",
        f"Generated by `kdkit bench signal-compression` from `leaderboards/results/{KIND}/*.json` (the newest); do "
        "not edit by hand. Each layout stores the same teacher signal and is read back the way training reads it; "
        "KL is KL(p_teacher || p_rec) in nats per position, where p_rec is the distribution the loss trains on "
        "(the stored top-k, the rest of the mass spread evenly over the other ids). Where the rounded stored "
        "values add up to all of the mass, p_rec gives the tail nothing and the KL is infinite: such positions "
        "are counted, and the mean is over the positions every kdkit layout reconstructs finitely (a DistillKit "
        "row: those of them it reconstructs finitely). Bytes per token: "
        "the store's shards on disk (zstd Parquet, token ids and labels included) over stored positions; the "
        "signal's own columns on disk (from the Parquet footers); and its payload before Parquet's encodings and "
        "zstd (ids at ceil(log2 V) bits, values at their width; compact: 16-bit id gaps, b-bit codes and two "
        "float16 per position).",
        "",
        f"Goal (issue 21): at most {BUDGET_BYTES} bytes per token on disk at k = 64 with a KL no worse than plain "
        f"top-32 in bf16 (`{BASELINE}`, KL {base['kl_mean']:.4f}).",
        "",
        f"Teacher {r['teacher']} over {r['blocks']} GSM8K train blocks of {r['block_size']} tokens "
        f"({r['positions']:,} positions, {r['common_positions']:,} finite in every kdkit layout; V = "
        f"{r['vocab_size']:,}); {r['threads']} thread(s) on {hw['device']} ({hw['cpu']}), torch {hw['torch']}; "
        f"`{r['command']}` at {r['git_commit']}, {r['time']}; teacher pass {r['teacher_seconds']:.0f} s, whole "
        f"bench {r['wall_seconds']:.0f} s.",
        "",
        "| layout | storage | k | values | on disk B/token | signal on disk B/token | payload B/token | KL (nats) "
        "| infinite-KL positions | KL vs top-32 bf16 | goal | DistillKit's published B/token | settings | device "
        "| command |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    settings = f"{r['teacher']}, {r['blocks']} x {r['block_size']} GSM8K train tokens, {r['threads']} thread(s)"
    device = f"{hw['device']} ({hw['cpu']})" if hw["device"] == "cpu" else hw["device"]
    for row in r["rows"]:
        goal = "-"
        if row["codec"] == "compact" and row["k"] == 64:
            ok = row["disk_bytes_per_token"] <= BUDGET_BYTES and row["kl_mean"] <= base["kl_mean"]
            goal = "met" if ok else "NOT met"
        lines.append(
            f"| `{row['name']}` | {row['layout']} | {row['k']} | {row['values']} | "
            f"{_fmt(row['disk_bytes_per_token'])} | {_fmt(row['signal_disk_bytes_per_token'])} | "
            f"{_fmt(row['payload_bytes_per_token'])} | {row['kl_mean']:.4f} | {row['infinite_kl_positions']} | "
            f"{row['kl_mean'] / base['kl_mean']:.2f}x | {goal} | {row.get('published', '-')} | {settings} | "
            f"{device} | `{r['command']}` |")
    lines += [
        "",
        f"`exact-{next(row['k'] for row in r['rows'] if row['name'].startswith('exact'))}` is no layout: the "
        "teacher's top-k in float32 with the uniform tail, the least KL any layout of that k reaches with this "
        "tail; the rest of a layout's KL is its rounding. The DistillKit rows are DistillKit's recommended and "
        f"budget settings ([README]({DISTILLKIT_README})) written by kdkit's exporter "
        "(`kdkit.llm.distillkit_layout`) from a float32 top-128 store of the same teacher and read back by kdkit "
        "(uniform tail; DistillKit itself also offers the support-only 'zero' tail). Their published bytes per "
        "token count the packed payload for their teachers' vocabularies (ids at 17-18 bits); here V = "
        f"{r['vocab_size']:,} takes 16.",
        "",
    ]
    path = Path(path or MARKDOWN)
    path.write_text("\n".join(lines) + "\n")
    return path
