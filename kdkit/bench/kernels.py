"""`kdkit bench kernels`: forward + backward of linear + token KD, fused (kdkit triton / torch reference, Liger)
against plain PyTorch (materialised logits, autograd): median time, peak memory, achieved TFLOP/s.

Why: the fused kernel exists to be fast and small; the numbers beside the goals say whether it is. On CUDA the
default grid is tokens {4096, 16384} x hidden {2048, 4096} x vocab {49152, 151936} in bf16, timed with CUDA
events after warm-up, peak memory from `torch.cuda.max_memory_allocated` above the inputs, and a measured bf16
matmul throughput as the roofline (on CPU too: 2048³ in the run's dtype). On CPU (no CUDA): SmolLM2-sized and
smaller shapes in fp32, wall-clock time, and peak memory as the growth of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs, freed heap trimmed first) over the resident set before the call: an OS-level measure that
counts every allocation, torch's or not. FLOPs = 2 * tokens * vocab * (3 * hidden + teacher hidden): the
student and teacher LM-head matmuls and the two student gradient matmuls (8 * tokens * hidden * vocab when the
teacher's hidden size is the student's). OOM is recorded as a row status, not a crash.

Results: one JSON per device at leaderboards/results/kernels/{device-slug}.json (rows merged by shape, dtype,
divergence and implementation) and leaderboards/kernels.md rendered from every JSON there.
"""
from __future__ import annotations

import gc
import json
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import yaml

from ..config import NonNegInt, PositiveFloat, PositiveInt, bad_value, coerce
from ..losses.token import DIVERGENCES, JSDBeta
from .memory import resident_growth
from .results import RESULTS_DIR, bench_options, git_commit, hardware

IMPLS = ("plain", "liger", "kdkit-triton", "kdkit-compiled", "kdkit-torch")
GOALS = ("faster than Liger on every shape", "at least 1.3x Liger's speed on the large shapes "
         f"(>= {2e13:.0e} FLOPs per step)", "peak memory at most Liger's",
         "at least 60% of the measured bf16 matmul roofline")
LARGE_FLOPS = 2e13
CUDA_GRID = {"tokens": [4096, 16384], "hidden": [2048, 4096], "vocab": [49152, 151936]}
# SmolLM2-135M's hidden size and vocabulary, a small one, and Gemma-3-270M's (262k vocabulary)
CPU_SHAPES = [(2048, 576, 49152), (512, 576, 8192), (512, 640, 262144)]
CPU_GOALS = ("kdkit at least 1.3x Liger's speed", "peak memory at most Liger's")


Axis = PositiveInt | list[PositiveInt] | str | None  # 4096, [4096, 16384] or "4096,16384"


@dataclass
class KernelOptions:
    """`kdkit bench kernels [key=value ...]`; unset values take the device's defaults (CUDA grid or CPU shapes)."""

    divergences: str = "jsd"  # comma list of token divergences
    tokens: Axis = None  # any of tokens/hidden/vocab replaces that axis of the default grid
    hidden: Axis = None
    vocab: Axis = None
    teacher_hidden: PositiveInt | None = None  # default: the student's hidden size
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # default: bfloat16 on CUDA, float32 on CPU
    impls: str | None = None  # comma list of IMPLS (default: all on CUDA, all but kdkit-triton on CPU)
    teacher: Literal["dense", "topk"] = "dense"  # hidden states + head, or a top-k signal (Liger has none)
    topk: PositiveInt = 64  # ids per position of the top-k teacher
    repeats: PositiveInt | None = None  # timed repeats (default 10 on CUDA, 2 on CPU)
    warmup: NonNegInt | None = None  # untimed repeats after the first (default 3 on CUDA, 1 on CPU)
    chunk_size: PositiveInt | None = None  # tokens per chunk (default: Liger 1024; kdkit its own auto_chunk_size)
    beta: JSDBeta = 0.5
    T: PositiveFloat = 1.0
    out: str | None = None  # result folder (default: leaderboards/results/kernels, and the table)
    tag: str = ""  # a label kept with the rows (e.g. "before" for a run of an earlier commit); part of the row key

    def validate(self, at: str) -> None:
        for key, allowed in (("divergences", DIVERGENCES), ("impls", IMPLS)):
            value = getattr(self, key)
            if value is not None and (not _list(value, str) or set(_list(value, str)) - set(allowed)):
                raise bad_value(f"{at}{key}", value, f"a comma list of {', '.join(allowed)}")
        for key in ("tokens", "hidden", "vocab"):
            value = getattr(self, key)
            if value is not None:
                setattr(self, key, [coerce(v, PositiveInt, f"{at}{key}") for v in _list(value, yaml.safe_load)])


def run_kernels(settings: list[str]) -> Path:
    """Measure every (shape, divergence, implementation), write the device's JSON (and the leaderboard)."""
    o = bench_options(KernelOptions, settings)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, o.dtype or ("bfloat16" if cuda else "float32"))
    impls = _list(o.impls or ("plain,liger,kdkit-triton,kdkit-torch" if cuda
                              else "plain,liger,kdkit-compiled,kdkit-torch"), str)
    repeats = o.repeats or (10 if cuda else 2)  # CPU: a plain JSD step at SmolLM2 size takes ~15 s on 2 cores
    # Each implementation at its own default chunk (Liger 1024, kdkit auto_chunk_size) unless chunk_size is given.
    opts = {"T": o.T, "beta": o.beta, "chunk_size": o.chunk_size, "teacher": o.teacher, "topk": o.topk}
    warmup = o.warmup if o.warmup is not None else (3 if cuda else 1)
    roofline = _matmul_tflops(dtype, device)
    command = " ".join(["kdkit bench kernels", *settings])
    rows = []
    for tokens, hidden, vocab in _shapes(o, cuda):
        t_hidden = o.teacher_hidden or hidden
        for divergence in _list(o.divergences, str):
            for impl in impls:
                row = {"impl": impl, "divergence": divergence, "tokens": tokens, "hidden": hidden,
                       "teacher_hidden": t_hidden, "vocab": vocab, "dtype": str(dtype).removeprefix("torch."),
                       "teacher": o.teacher + (f"-{o.topk}" if o.teacher == "topk" else ""), "tag": o.tag,
                       "chunk_size": _chunk(impl, opts["chunk_size"], vocab, device), "commit": git_commit(),
                       "command": command, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
                row |= _measure(impl, divergence, tokens, hidden, t_hidden, vocab, dtype, device, opts, repeats,
                                warmup)
                if row.get("median_ms"):
                    # a top-k teacher has no LM-head matmul of its own
                    flops = 2.0 * tokens * vocab * (3 * hidden + (t_hidden if o.teacher == "dense" else 0))
                    row["tflops"] = flops / (row["median_ms"] * 1e-3) / 1e12
                    row["roofline_tflops"] = roofline
                    row["roofline_frac"] = row["tflops"] / roofline
                rows.append(row)
                print(_line(row), flush=True)
                # written row by row: a long CPU run that dies keeps what it measured
                path = _write(rows, device, roofline if cuda else None, command, Path(o.out) if o.out else None)
    if not o.out:
        print(f"wrote {write_kernels_markdown()}")
    return path


def _chunk(impl: str, chunk: int | None, vocab: int, device: torch.device) -> int | None:
    """The chunk an implementation runs with: the one given, else its own default (plain: none)."""
    if impl == "plain":
        return None
    if chunk:
        return int(chunk)
    if impl == "liger":
        return 1024
    from ..kernels.fused_linear_kd import auto_chunk_size

    return auto_chunk_size(vocab, device)


def _list(value, kind) -> list:
    """'a,b' or a YAML list or a single value -> [kind(a), kind(b)]."""
    items = value if isinstance(value, list) else str(value).split(",")
    return [kind(str(v).strip()) for v in items if str(v).strip()]


def _shapes(o: KernelOptions, cuda: bool) -> list[tuple[int, int, int]]:
    """The CUDA grid or the CPU shapes; any of tokens/hidden/vocab given replaces that axis (a grid then)."""
    given = {k: getattr(o, k) for k in ("tokens", "hidden", "vocab")}
    if all(v is None for v in given.values()):
        if cuda:
            return [(t, h, v) for t in CUDA_GRID["tokens"] for h in CUDA_GRID["hidden"] for v in CUDA_GRID["vocab"]]
        return list(CPU_SHAPES)
    base = CUDA_GRID if cuda else {"tokens": [CPU_SHAPES[0][0]], "hidden": [CPU_SHAPES[0][1]],
                                   "vocab": [CPU_SHAPES[0][2]]}
    axes = {k: v if v is not None else base[k] for k, v in given.items()}
    return [(t, h, v) for t in axes["tokens"] for h in axes["hidden"] for v in axes["vocab"]]


def _inputs(tokens, hidden, t_hidden, vocab, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    h_s = r(tokens, hidden, scale=1.0).requires_grad_()
    w_s = r(vocab, hidden, scale=hidden ** -0.5).requires_grad_()
    h_t, w_t = r(tokens, t_hidden, scale=1.0), r(vocab, t_hidden, scale=t_hidden ** -0.5)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[torch.rand(tokens, generator=g) < 0.1] = -100  # some prompt / padding tokens
    return h_s, w_s, h_t, w_t, labels.to(device)


def _topk_signal(h_t, w_t, k: int, T: float):
    """The dense teacher's top-k ids and log-probs at T (made once, outside the timed step)."""
    from ..signals import TopK

    with torch.no_grad():
        logp = torch.log_softmax((h_t @ w_t.T).float() / T, dim=-1)
        lp, idx = logp.topk(k, dim=-1)
    return TopK(temperature=T, indices=idx, logprobs=lp)


def _loss_fn(impl, divergence, inputs, opts):
    """A zero-argument closure computing the loss of one implementation (None where it does not apply)."""
    h_s, w_s, h_t, w_t, labels = inputs
    T, beta, chunk = float(opts["T"]), float(opts["beta"]), opts["chunk_size"]
    topk = _topk_signal(h_t, w_t, opts["topk"], T) if opts["teacher"] == "topk" else None
    if impl == "plain":
        from ..losses.token import token_kd_loss

        def plain():
            z = h_s @ w_s.T
            with torch.no_grad():
                t = h_t @ w_t.T if topk is None else topk.teacher_logits(T, w_s.shape[0])
            return token_kd_loss(z, t, labels, divergence=divergence, T=T, beta=beta)
        return plain
    if impl == "liger" and topk is not None:
        return None  # Liger's distillation losses take a dense teacher only
    if impl == "liger":
        # Liger's generalised JSD has kdkit's convention (beta=0 forward KL, beta=1 reverse KL); it has no T^2.
        liger_beta = {"jsd": beta, "fkl": 0.0, "rkl": 1.0}.get(divergence)
        if liger_beta is None:
            return None
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        except ImportError:
            return None
        mod = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=liger_beta,
                                      temperature=T, chunk_size=chunk or 1024)
        return lambda: mod(h_s, w_s, h_t, w_t, labels)
    from ..kernels import fused_linear_kd

    backend = impl.removeprefix("kdkit-")
    if topk is not None:
        return lambda: fused_linear_kd(h_s, w_s, labels=labels, teacher=topk, divergence=divergence, T=T, beta=beta,
                                       chunk_size=chunk, backend=backend)
    return lambda: fused_linear_kd(h_s, w_s, h_t, w_t, labels, divergence=divergence, T=T, beta=beta,
                                   chunk_size=chunk, backend=backend)


def _measure(impl, divergence, tokens, hidden, t_hidden, vocab, dtype, device, opts, repeats, warmup) -> dict:
    """{'status', 'median_ms', 'peak_mib', 'loss'} of forward + backward, or the reason there is none."""
    cuda = device.type == "cuda"
    if impl == "kdkit-triton" and not cuda:
        return {"status": "n/a (needs CUDA)"}
    inputs = None
    try:
        inputs = _inputs(tokens, hidden, t_hidden, vocab, dtype, device)
        fn = _loss_fn(impl, divergence, inputs, opts)
        if fn is None:
            return {"status": "n/a"}
        h_s, w_s = inputs[0], inputs[1]

        def step():
            h_s.grad = w_s.grad = None
            loss = fn()
            loss.backward()
            return loss

        if warmup:  # the first call compiles (kdkit-compiled, Liger): its memory is not the step's
            step()
        peak, loss = _peak(step, cuda)
        for _ in range(max(warmup - 2, 0)):
            step()
        times = [_timed(step, cuda) for _ in range(repeats)]
        return {"status": "ok", "median_ms": statistics.median(times), "peak_mib": peak / 2 ** 20,
                "loss": float(loss), "repeats": repeats}
    except torch.OutOfMemoryError:
        return {"status": "oom"}
    except Exception as e:  # noqa: BLE001 - one failing implementation must not lose the other rows
        if "out of memory" in str(e).lower():  # some allocators raise a plain RuntimeError on OOM
            return {"status": "oom"}
        return {"status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    finally:
        del inputs
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def _timed(step, cuda: bool) -> float:
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1e3


def _peak(step, cuda: bool) -> tuple[float, torch.Tensor]:
    """Peak bytes one step adds above what is allocated (resident, on CPU) before it; this run is a warm-up."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = step()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base), loss.detach()
    peak, loss = resident_growth(step)
    return peak, loss.detach()


def _matmul_tflops(dtype: torch.dtype, device: torch.device) -> float:
    """The device's achieved dense matmul throughput in `dtype` (n x n x n: 8192 on CUDA, median of 10; 2048 on
    CPU, median of 5): the roofline rows are held to. The fused step is 4 such matmuls plus its row math."""
    cuda = device.type == "cuda"
    n = 8192 if cuda else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3 if cuda else 1):
        a @ b
    times = [_timed(lambda: a @ b, cuda) for _ in range(10 if cuda else 5)]
    return 2 * n ** 3 / (statistics.median(times) * 1e-3) / 1e12


def _line(row: dict) -> str:
    shape = f"{row['divergence']} tokens={row['tokens']} hidden={row['hidden']} vocab={row['vocab']}"
    if row["status"] != "ok":
        return f"{row['impl']:>13}: {shape}: {row['status']}"
    return (f"{row['impl']:>13}: {shape}: {row['median_ms']:9.2f} ms  {row['peak_mib']:9.1f} MiB peak  "
            f"{row['tflops']:7.3f} TFLOP/s  loss {row['loss']:.6f}")


def device_slug() -> str:
    hw = hardware()
    name = hw["device"] if hw["device"] != "cpu" else f"cpu-{hw['cpu']}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]


def _versions() -> dict:
    out = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for pkg in ("triton", "liger_kernel"):
        try:
            from importlib.metadata import version

            out[pkg.replace("_kernel", "")] = version(pkg.replace("_", "-"))
        except Exception:  # noqa: BLE001 - absent package: recorded as missing
            out[pkg.replace("_kernel", "")] = None
    return out


def _write(rows: list[dict], device: torch.device, roofline: float | None, command: str, out: Path | None) -> Path:
    """Merge `rows` into the device's JSON: a new row replaces an old one of the same key."""
    directory = out or RESULTS_DIR / "kernels"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{device_slug()}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    key = lambda r: (r["impl"], r.get("tag", ""), r.get("teacher", "dense"), r["divergence"], r["tokens"],  # noqa
                     r["hidden"], r["teacher_hidden"], r["vocab"], r["dtype"], r["chunk_size"])
    merged = {key(r): r for r in old.get("rows", [])} | {key(r): r for r in rows}
    hw = hardware()
    record = {"kind": "kernels", "device": hw["device"] if device.type == "cuda" else f"cpu ({hw['cpu']})",
              "threads": hw["threads"], **_versions(), "git_commit": git_commit(), "command": command,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "matmul_roofline_tflops": roofline if roofline is not None else old.get("matmul_roofline_tflops"),
              "peak_memory_method": ("torch.cuda.max_memory_allocated above the inputs" if device.type == "cuda"
                                     else "peak resident set growth (VmHWM reset via /proc/self/clear_refs)"),
              "rows": sorted(merged.values(), key=_row_order)}
    path.write_text(json.dumps(record, indent=1))
    return path


def _row_order(r: dict) -> tuple:
    """Table order: dtype, teacher, divergence, shape, then the implementations with earlier runs first."""
    return (r["dtype"], r.get("teacher", "dense"), r["divergence"], r["tokens"], r["hidden"], r["vocab"],
            IMPLS.index(r["impl"]), r.get("tag", "") == "")


def write_kernels_markdown(results_dir: Path | None = None, path: Path | None = None) -> Path:
    """leaderboards/kernels.md from every leaderboards/results/kernels/*.json: the goals beside the numbers."""
    directory = Path(results_dir or RESULTS_DIR / "kernels")
    path = Path(path or RESULTS_DIR.parent / "kernels.md")
    lines = ["# Fused linear + token-KD kernel", "",
             "Generated by `kdkit bench kernels` from `leaderboards/results/kernels/*.json`. Forward + backward of "
             "the LM-head matmuls and the token-KD loss (student gradients only); FLOPs = 2 · tokens · vocab · "
             "(3 · hidden + teacher hidden), without the teacher term for a top-k teacher. Implementations: `plain` (materialised logits + `token_kd_loss`, "
             "autograd), `liger` (Liger-Kernel's `LigerFusedLinearJSDLoss`, weight_hard_loss=0; fkl/rkl as its "
             "beta=0/1; it takes a dense teacher only), and `kdkit.kernels.fused_linear_kd` with its backends: "
             "`kdkit-triton` (CUDA), `kdkit-compiled` (cache-sized row blocks through `torch.compile`) and "
             "`kdkit-torch` (the same blocks, eager). Teacher `dense` is hidden states + LM head; `topk-K` is a "
             "sparse top-K signal densified per block; Liger has no sparse-teacher path, so a top-k row's ratios "
             "against Liger are against Liger's dense-teacher row of the same shape (the same job, with the "
             "teacher's signal stored instead of recomputed). A tagged implementation (`kdkit-torch (before)`) is an "
             "earlier commit measured on the same machine in the same session; its ratios are against that "
             "table's Liger and plain rows. `% roofline` is the row's FLOP rate over the dense matmul throughput "
             "measured in the same run and dtype (CUDA 8192³, CPU 2048³): a fused step is 4 LM-head-sized "
             "matmuls plus its row math, so near 100% no implementation can be much faster. FLOPs count every "
             "token: kdkit skips the matmuls of masked tokens (10% of the bench's), so its share can pass 100%. "
             "Where Liger runs above 1/1.3 = 77% of the roofline, 1.3x its speed needs more than the matmuls "
             "allow.", "",
             "Goals on a CUDA GPU (`kdkit-triton`, bf16): " + "; ".join(GOALS) + ".", "",
             "Goals on CPU (`kdkit-compiled`, fp32 and bf16, fkl/rkl/jsd, dense and top-k teachers): "
             + "; ".join(CPU_GOALS) + ".", ""]
    records = [json.loads(f.read_text()) for f in sorted(directory.glob("*.json"))]
    if not any(not r["device"].startswith("cpu") for r in records):
        lines += ["No GPU results yet: the CUDA goals are unmeasured (`scripts/gpu-check.sh kernels` measures "
                  "them when a GPU is lent).", ""]
    for r in records:
        roof = r.get("matmul_roofline_tflops")
        lines += [f"## {r['device']}", "",
                  f"torch {r.get('torch')}, triton {r.get('triton')}, liger-kernel {r.get('liger')}; "
                  f"{r.get('threads')} CPU threads; peak memory: {r.get('peak_memory_method')}; "
                  + (f"measured bf16 matmul roofline {roof:.0f} TFLOP/s; " if roof else "")
                  + f"last run `{r.get('command')}` at {r.get('git_commit')}.", "",
                  "| dtype | teacher | divergence | tokens | hidden | vocab | chunk | impl | median ms | TFLOP/s "
                  "| % roofline | peak MiB | speed-up vs Liger | memory vs Liger | speed-up vs plain "
                  "| memory vs plain | goals met | status | command |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        rows = r["rows"]
        for row in rows:
            ratios = _ratios(row, rows)
            impl = row["impl"] + (f" ({row['tag']})" if row.get("tag") else "")
            lines.append("| " + " | ".join([
                row["dtype"], row.get("teacher", "dense"), row["divergence"], str(row["tokens"]),
                str(row["hidden"]), str(row["vocab"]), "-" if row["impl"] == "plain" else str(row["chunk_size"]),
                impl, _num(row.get("median_ms"), ".2f"), _num(row.get("tflops"), ".3f"),
                _num(100 * row["roofline_frac"] if "roofline_frac" in row else None, ".0f"),
                _num(row.get("peak_mib"), ".1f"), _x(ratios.get("speedup_vs_liger")),
                _x(ratios.get("mem_vs_liger")), _x(ratios.get("speedup_vs_plain")), _x(ratios.get("mem_vs_plain")),
                _goals(row, ratios, cpu=r["device"].startswith("cpu")), row["status"],
                f"`{row.get('command', '')}`"]) + " |")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def _ratios(row: dict, rows: list[dict]) -> dict:
    """A kdkit row's speed and memory ratios against the untagged Liger and plain rows of its shape."""
    if not row["impl"].startswith("kdkit") or row.get("status") != "ok":
        return {}
    same = ("dtype", "divergence", "tokens", "hidden", "teacher_hidden", "vocab")
    out = {}
    for ref in ("liger", "plain"):
        # Liger has no sparse-teacher path: a top-k row is set against Liger's dense-teacher row (the same job)
        teacher = "dense" if ref == "liger" else row.get("teacher", "dense")
        base = next((b for b in rows if b["impl"] == ref and not b.get("tag") and b.get("status") == "ok"
                     and b.get("teacher", "dense") == teacher and all(b.get(k) == row.get(k) for k in same)), None)
        if base is not None:
            out[f"speedup_vs_{ref}"] = base["median_ms"] / row["median_ms"]
            if base["peak_mib"] and base["peak_mib"] == base["peak_mib"] and base["peak_mib"] > 0:
                out[f"mem_vs_{ref}"] = row["peak_mib"] / base["peak_mib"]
    return out


def _goals(row: dict, ratios: dict, cpu: bool) -> str:
    """Which goals a row meets: on CUDA kdkit-triton's (speed vs Liger, 1.3x on large shapes, memory,
    roofline); on CPU kdkit-compiled's (1.3x Liger, memory at most Liger's)."""
    if row.get("status") != "ok" or row.get("tag") or row["impl"] != ("kdkit-compiled" if cpu else "kdkit-triton"):
        return "-"
    flops = 2.0 * row["tokens"] * row["vocab"] * (3 * row["hidden"] + row["teacher_hidden"])
    marks = []
    if "speedup_vs_liger" in ratios:
        need = 1.3 if cpu or flops >= LARGE_FLOPS else 1.0
        marks.append(f"speed {'yes' if ratios['speedup_vs_liger'] >= need else 'NO'} (>={need}x)")
    if "mem_vs_liger" in ratios:
        marks.append(f"memory {'yes' if ratios['mem_vs_liger'] <= 1.0 else 'NO'}")
    if "roofline_frac" in row and not cpu:
        marks.append(f"roofline {'yes' if row['roofline_frac'] >= 0.6 else 'NO'}")
    return ", ".join(marks) or "-"


def _num(v, fmt: str) -> str:
    return "-" if v is None or v != v else format(v, fmt)


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"
