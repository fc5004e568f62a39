"""`kdkit bench served-teacher`: teacher-signal throughput of a served teacher (vLLM, top-k prompt log-probs over
HTTP) against the same teacher run locally (transformers forward + top-k), on the same GSM8K token blocks.

Both sides produce exactly what a run consumes: the top-k ids and log-probs at every position of every block
(`ServedTeacher.topk_signal` against `log_softmax(model(blocks).logits).topk(k)`). The server is started by the bench
(`kdkit serve-teacher`'s flags, in `.venv-vllm` here), warmed up, timed, and stopped; the local teacher runs in
this process with the same thread count. Tokens/s = scored tokens / wall seconds of the scoring call alone.
"""
from __future__ import annotations

import os
import socket
import tempfile
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import PositiveInt
from ..errors import KdkitError
from .results import RESULTS_DIR, bench_options, read_results, write_result

KIND = "served-teacher"


@dataclass
class ServedTeacherBench:
    """`kdkit bench served-teacher` options."""

    model: str = "smollm2-135m-instruct"
    blocks: PositiveInt = 16  # GSM8K train text packed into blocks of block_size tokens
    block_size: PositiveInt = 256
    k: PositiveInt = 20
    batch_size: PositiveInt = 8  # blocks per local forward / per topk_signal call
    concurrency: PositiveInt = 4  # requests in flight to the server
    threads: PositiveInt = 1  # torch threads locally, OMP threads in the server
    vllm_python: str | None = None  # default: kdkit serve-teacher's choice
    out: str | None = None


def _blocks(model: str, n: int, length: int):
    from ..llm.models import load_tokenizer
    from ..llm.text_data import load_texts, pack_blocks

    tok = load_tokenizer(model)
    return tok, pack_blocks(load_texts("gsm8k", "train", limit=max(64, 4 * n)), tok, length)[:n]


def _time_local(model: str, blocks, k: int, batch: int) -> float:
    from ..llm.models import load_causal_lm

    teacher, _ = load_causal_lm(model, dtype="float32")
    teacher.eval()
    with torch.inference_mode():
        teacher(input_ids=blocks[:1])  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(blocks), batch):
            teacher(input_ids=blocks[i:i + batch]).logits[:, :-1].float().log_softmax(-1).topk(k, dim=-1)
        return time.perf_counter() - t0


def _time_served(opts: ServedTeacherBench, tok, blocks, log: Path) -> tuple[float, float]:
    """(seconds to score every block through the server, seconds the server took to start)."""
    from ..llm.models import resolve_lm
    from ..llm.serve_teacher import serve_argv, wait_until_ready
    from ..llm.teacher_server import ServedTeacher

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = serve_argv(resolve_lm(opts.model), name=opts.model, port=port, max_logprobs=opts.k,
                      max_model_len=opts.block_size + 16, dtype="float32", python=opts.vllm_python)
    env = {**os.environ, "OMP_NUM_THREADS": str(opts.threads), "VLLM_CPU_KVCACHE_SPACE": "1"}
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        try:
            wait_until_ready(url, proc, timeout=600)
        except KdkitError as e:
            raise KdkitError(f"{e}; its log ends: {' | '.join(log.read_text().splitlines()[-3:])}") from None
        start_s = time.perf_counter() - t0
        client = ServedTeacher(url, tok, k=opts.k, concurrency=opts.concurrency, timeout=600)
        client.check()
        client.topk_signal(blocks[:1])  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(blocks), opts.batch_size):
            client.topk_signal(blocks[i:i + opts.batch_size])
        return time.perf_counter() - t0, start_s
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_served_teacher(settings: list[str]) -> dict:
    opts = bench_options(ServedTeacherBench, settings)
    torch.set_num_threads(opts.threads)
    tok, blocks = _blocks(opts.model, opts.blocks, opts.block_size)
    scored = blocks.shape[0] * (blocks.shape[1] - 1)
    local_s = _time_local(opts.model, blocks, opts.k, opts.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        served_s, start_s = _time_served(opts, tok, blocks, Path(tmp) / "server.log")
    row = {"setting": {"model": opts.model, "blocks": int(blocks.shape[0]), "block_size": opts.block_size,
                       "k": opts.k, "batch_size": opts.batch_size, "concurrency": opts.concurrency,
                       "threads": opts.threads},
           "scored_tokens": scored, "local_s": local_s, "served_s": served_s, "server_start_s": start_s,
           "local_tokens_per_s": scored / local_s, "served_tokens_per_s": scored / served_s}
    path = write_result(KIND, row, Path(opts.out) if opts.out else None)
    print(f"local {row['local_tokens_per_s']:.0f} tokens/s, served {row['served_tokens_per_s']:.0f} tokens/s "
          f"({scored} tokens; server start {start_s:.0f} s) -> {path}")
    if opts.out is None:
        print(f"wrote {write_markdown()}")
    return row


def write_markdown(directory: Path | None = None, path: Path | None = None) -> Path:
    """leaderboards/served-teacher.md from every result file."""
    path = path or RESULTS_DIR.parent / "served-teacher.md"
    lines = ["# Served teacher: top-k scoring throughput, vLLM server against the local teacher", "",
             "Generated by `kdkit bench served-teacher` from `leaderboards/results/served-teacher/*.json`. Both sides "
             "produce the top-k ids and log-probs at every position of the same GSM8K token blocks: the local teacher "
             "by a transformers forward + top-k in the bench's process, the served one by vLLM's OpenAI server "
             "(`prompt_logprobs`, started with `kdkit serve-teacher`'s flags) through `ServedTeacher`, HTTP and JSON "
             "included. Tokens/s = scored tokens / wall seconds of the scoring alone (after a warm-up; the server's "
             "start-up is listed apart).", "",
             "| model | blocks × tokens | k | threads | concurrency | local tokens/s | served tokens/s | served / local "
             "| server start s | local torch | device | command |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in read_results(KIND, directory):
        s, hw = r["setting"], r["hardware"]
        lines.append(f"| {s['model']} | {s['blocks']} × {s['block_size']} | {s['k']} | {s['threads']} | "
                     f"{s['concurrency']} | {r['local_tokens_per_s']:.0f} | {r['served_tokens_per_s']:.0f} | "
                     f"{r['served_tokens_per_s'] / r['local_tokens_per_s']:.2f}× | {r['server_start_s']:.0f} | "
                     f"{hw['torch']} | {hw['device']} ({hw['cpu']}) | `{r['command']}` |")
    path.write_text("\n".join(lines) + "\n")
    return path
