"""`kdkit bench multi-teacher`: several LM teachers, routed by source or mixed, against one teacher and none.

Two real text sources: GSM8K word problems (question + worked answer) and reasoning-gym chain sums (question +
step-by-step sum), `source` column per text, alternating. A small byte-level BPE (512 ids) is trained on both
sources' training text, and one specialist teacher per source (a 4-layer Llama, `kdkit train` on that source
alone). Students (a 2-layer Llama from scratch, same budget and seeds) learn from the mixed training text with:

- `none`: no teacher (`kdkit train`, cross-entropy only);
- `one`: the GSM8K specialist alone, on every text (`teacher.model`);
- `mean` / `learned`: both teachers' distributions mixed (`llm.multi_teacher.mix`);
- `route`: each text's own specialist (`mix=route route_by=source`).

Every student is scored by this bench on each source's test blocks (perplexity = exp(mean next-token NLL)). Rows are
written one result file per (variant, seed) as they finish; a rerun skips the rows it has, so an interrupted bench
resumes. Teachers, data and tokenizer are made once in `work`.
"""
from __future__ import annotations

import hashlib
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ..config import PositiveInt
from ..llm.tokenizers import train_byte_bpe
from .results import RESULTS_DIR, bench_options, mean_std, name_list, read_results, run_kdkit, run_record

KIND = "multi-teacher"
SOURCES = ("gsm8k", "chain_sum")
VARIANTS = ("none", "one", "mean", "learned", "route")
TEACHER = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
           "tie_word_embeddings": True}
STUDENT = dict(TEACHER, num_hidden_layers=2)


@dataclass
class MultiTeacherBench:
    """`kdkit bench multi-teacher` options."""

    seeds: PositiveInt = 3
    variants: list[str] | str = field(default_factory=lambda: list(VARIANTS))  # a list or a comma list
    texts: PositiveInt = 2000  # training texts per source
    test_texts: PositiveInt = 200  # test texts per source
    block_size: PositiveInt = 64
    teacher_steps: PositiveInt = 400
    steps: PositiveInt = 200  # student optimiser steps (batch 16)
    threads: PositiveInt = 2
    work: str = "runs/bench-multi-teacher"  # data, tokenizer, teachers and student runs
    out: str | None = None  # result files (default leaderboards/results/multi-teacher)
    # smollm2: the real models instead (recipes smollm2-kd-small / smollm2-route-small: SmolLM2-135M-Instruct for
    # GSM8K, `specialist` for chain sums, a 15-layer truncation as the student, data.name=gsm8k+chain_sum)
    scale: Literal["tiny", "smollm2"] = "tiny"
    specialist: str = "runs/cot-chainsum-teacher/sft/model"  # kdkit train recipe=cot-chainsum-teacher name=cot-chainsum-teacher


def _texts(source: str, split: str, n: int) -> list[str]:
    if source == "gsm8k":
        from ..llm.text_data import load_texts

        return load_texts("gsm8k", split, limit=n)
    from ..data import load_chain_sum

    ds = load_chain_sum(split)
    return [q + "\n" + a for q, a in zip(ds["question"][:n], ds["answer"][:n])]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def prepare_data(opts: MultiTeacherBench, work: Path) -> dict:
    """The mixed dataset (`work/data/{train,test}.jsonl`), one folder per source, and the shared tokenizer."""
    texts = {(s, sp): _texts(s, sp, n) for s in SOURCES for sp, n in (("train", opts.texts),
                                                                      ("test", opts.test_texts))}
    for split in ("train", "test"):
        mixed = [{"text": t, "source": s} for pair in zip(*(texts[s, split] for s in SOURCES))
                 for s, t in zip(SOURCES, pair)]
        _write_jsonl(work / "data" / f"{split}.jsonl", mixed)
        for s in SOURCES:
            _write_jsonl(work / f"data-{s}" / f"{split}.jsonl", [{"text": t} for t in texts[s, split]])
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        train_byte_bpe([t for s in SOURCES for t in texts[s, "train"]], tok_dir, vocab_size=512)
    return {"texts": texts, "tokenizer": tok_dir}


def _common(opts: MultiTeacherBench, work: Path, tok: Path, config: dict, seed: int) -> list[str]:
    return ["recipe=lm-scratch", "llm.text_field=text", f"llm.block_size={opts.block_size}", "data.batch_size=16",
            "optim.lr=3e-3", "optim.weight_decay=0.0", "scheduler.name=cosine", "scheduler.warmup_epochs=0.05",
            "trainer.progress=false", f"trainer.threads={opts.threads}", f"trainer.seed={seed}",
            f"output_dir={work}", "student.model=scratch",
            f"student.options={json.dumps({'tokenizer': str(tok), 'config': config})}"]


def train_teachers(opts: MultiTeacherBench, work: Path, tok: Path) -> dict[str, Path]:
    """One specialist per source (made once; an existing one is reused)."""
    out = {}
    for s in SOURCES:
        run = work / f"teacher-{s}"
        if not (run / "student" / "config.json").is_file():
            run_kdkit(["train", *_common(opts, work, tok, TEACHER, 0), f"data.name={work / f'data-{s}'}",
                       f"name=teacher-{s}", f"llm.max_steps={opts.teacher_steps}", "resume=auto"])
        out[s] = run / "student"
    return out


def variant_args(variant: str, teachers: dict[str, Path]) -> tuple[str, list[str]]:
    """(verb, recipe overrides) of one variant."""
    kd = ["ce_weight=0.2", "losses={kd: {type: token_kd, weight: 0.8, divergence: fkl}}"]
    both = f"teachers=[{{model: {teachers['gsm8k']}}}, {{model: {teachers['chain_sum']}}}]"
    if variant == "none":
        return "train", ["ce_weight=1.0", "losses={}"]
    if variant == "one":
        return "distill", [*kd, f"teacher.model={teachers['gsm8k']}"]
    if variant == "route":
        return "distill", [*kd, both, "teacher.model=null", "llm.multi_teacher.mix=route",
                           "llm.multi_teacher.route_by=source", f"llm.multi_teacher.route_values=[{','.join(SOURCES)}]"]
    return "distill", [*kd, both, "teacher.model=null", f"llm.multi_teacher.mix={variant}"]


@torch.no_grad()
def source_perplexity(model_dir: Path, texts: dict, tok_dir: Path, block_size: int) -> dict[str, float]:
    """exp(mean next-token NLL) of the model over each source's test blocks (packed as the runs pack them)."""
    from transformers import AutoTokenizer

    from ..llm.held_out import block_scores
    from ..llm.models import load_causal_lm
    from ..llm.text_data import pack_blocks

    model, _ = load_causal_lm(str(model_dir), dtype="float32")
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    return {s: block_scores(model, pack_blocks(texts[s, "test"], tok, block_size), 32)[0] for s in SOURCES}


def _setting(opts: MultiTeacherBench) -> dict:
    if opts.scale == "smollm2":
        return {"scale": "smollm2", "test_texts": opts.test_texts, "block_size": opts.block_size,
                "steps": opts.steps, "threads": opts.threads, "specialist": opts.specialist}
    return {"texts": opts.texts, "test_texts": opts.test_texts, "block_size": opts.block_size,
            "teacher_steps": opts.teacher_steps, "steps": opts.steps, "threads": opts.threads}


def smollm2_args(variant: str, opts: MultiTeacherBench, work: Path, name: str, seed: int) -> list[str]:
    """One variant on the real models: the shipped recipes, with the bench's steps, seed and data."""
    common = [f"output_dir={work}", f"name={name}", f"trainer.seed={seed}", f"trainer.threads={opts.threads}",
              "trainer.progress=false", "data.name=gsm8k+chain_sum", f"llm.max_steps={opts.steps}",
              f"llm.block_size={opts.block_size}"]
    if variant == "none":
        return ["train", "recipe=smollm2-kd-small", *common, "ce_weight=1.0", "losses={}"]
    if variant == "one":
        return ["distill", "recipe=smollm2-kd-small", *common]
    routed = ["distill", "recipe=smollm2-route-small", *common, f"teachers.1.model={opts.specialist}"]
    if variant == "route":
        return routed
    return [*routed, f"llm.multi_teacher.mix={variant}", "llm.multi_teacher.route_by=null",
            "llm.multi_teacher.route_values=[]"]


def _smollm2_texts(opts: MultiTeacherBench) -> dict:
    return {(s, "test"): _texts(s, "test", opts.test_texts) for s in SOURCES}


def run_multi_teacher(settings: list[str]) -> Path:
    opts = bench_options(MultiTeacherBench, settings)
    variants = name_list(opts.variants, "variants", VARIANTS)
    out = Path(opts.out) if opts.out else RESULTS_DIR / KIND
    work = Path(opts.work).resolve()
    torch.set_num_threads(opts.threads)
    if opts.scale == "smollm2":
        from ..llm.models import resolve_lm

        if not (Path(opts.specialist) / "config.json").is_file():
            from ..errors import ConfigError

            raise ConfigError(f"specialist={opts.specialist} holds no model; make it with `kdkit train recipe="
                              "cot-chainsum-teacher name=cot-chainsum-teacher` (its RUN/sft/model), or name another "
                              "chain-sum teacher")
        data = {"texts": _smollm2_texts(opts), "tokenizer": None}
        teachers = {"gsm8k": Path(resolve_lm("smollm2-135m-instruct")), "chain_sum": Path(opts.specialist).resolve()}
    else:
        data = prepare_data(opts, work)
        teachers = train_teachers(opts, work, data["tokenizer"])
    teacher_ppl = {s: source_perplexity(p, data["texts"], data["tokenizer"] or p, opts.block_size)
                   for s, p in teachers.items()}
    setting = _setting(opts)
    have = {(r["variant"], r["seed"]) for r in read_results(KIND, out) if r["setting"] == setting}
    command = "kdkit bench multi-teacher " + " ".join(settings)
    for seed in range(opts.seeds):
        for variant in variants:
            if (variant, seed) in have:
                continue
            name = f"{variant}-seed{seed}" + ("-smollm2" if opts.scale == "smollm2" else "")
            if opts.scale == "smollm2":
                args = smollm2_args(variant, opts, work, name, seed)
            else:
                verb, extra = variant_args(variant, teachers)
                args = [verb, *_common(opts, work, data["tokenizer"], STUDENT, seed), f"data.name={work / 'data'}",
                        f"name={name}", f"llm.max_steps={opts.steps}", *extra]
            cmd, wall = run_kdkit(args)
            summary = json.loads((work / name / "metrics.json").read_text())["summary"]
            student = work / name / "student"
            row = run_record(KIND, command, cmd, wall, variant=variant, seed=seed, setting=setting,
                             student_ppl=source_perplexity(student, data["texts"], data["tokenizer"] or student,
                                                           opts.block_size),
                             run_ppl=summary["student_ppl"], teacher_ppl=teacher_ppl,
                             teacher_weights=summary.get("teacher_weights"),
                             blocks_per_teacher=summary.get("blocks_per_teacher"))
            out.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:8]
            (out / f"{name}-{digest}.json").write_text(json.dumps(row, indent=1))
            print(f"{name}: " + ", ".join(f"{s} {v:.2f}" for s, v in row["student_ppl"].items()) + f" ({wall:.0f} s)")
    return write_markdown(out, out / "llm-multi-teacher.md" if opts.out else None)


def _reading(by_variant: dict) -> list[str]:
    """Each variant against the no-teacher student, per source, in units of the larger seed spread."""
    def stats(variant, source):
        v = [r["student_ppl"][source] for r in by_variant[variant]]
        return statistics.mean(v), statistics.stdev(v) if len(v) > 1 else math.nan

    if "none" not in by_variant:
        return []
    out = ["Against the no-teacher student (perplexity change; 'within noise' when it is not larger than the "
           "larger of the two seed spreads):", ""]
    for variant in (v for v in VARIANTS if v in by_variant and v != "none"):
        parts = []
        for source in SOURCES:
            (m, sd), (m0, sd0) = stats(variant, source), stats("none", source)
            spread = max(sd, sd0)
            verdict = ("one seed: no spread to judge by" if math.isnan(spread) else "within noise"
                       if abs(m - m0) <= spread else "better" if m < m0 else "worse")
            parts.append(f"{source} {m - m0:+.2f} ({verdict})")
        out.append(f"- `{variant}`: " + ", ".join(parts))
    if {"mean", "learned"} & set(by_variant):
        out += ["", "Why the mixtures lose: each specialist is poor on the other source (the table's teacher line), so "
                "half of a mean mixture's target on a text is the wrong specialist's guess; learned weights are one pair "
                "for all texts and cannot tell the sources apart. Routing gives each text its own specialist."]
    return out


def _specialists(teacher_ppl: dict) -> list[str]:
    """A warning where a source's specialist is not the better teacher of its own source (routing cannot help)."""
    out = []
    for source, own in teacher_ppl.items():
        others = [p[source] for s, p in teacher_ppl.items() if s != source]
        other = min(others, default=math.inf)
        if own[source] >= other:
            out.append(f"Note: the {source} specialist is no better on {source} text than the other teacher "
                       f"({own[source]:.2f} vs {other:.2f}), so routing {source} to it cannot be expected to help.")
    return ["", *out] if out else []


def write_markdown(directory: Path | None = None, path: Path | None = None) -> Path:
    """leaderboards/llm-multi-teacher.md: mean ± std over seeds of each variant's per-source perplexity."""
    path = path or RESULTS_DIR.parent / "llm-multi-teacher.md"
    rows = read_results(KIND, directory)
    lines = ["# Multi-teacher LM distillation: routing by source vs mixing vs one teacher", "",
             "Generated by `kdkit bench multi-teacher` from `leaderboards/results/multi-teacher/*.json`. Two real text "
             "sources, alternating in one training set with a `source` column: GSM8K word problems (question + worked "
             "answer) and reasoning-gym chain sums (question + step-by-step sum). One specialist teacher per source "
             "(4-layer Llama, hidden 64, trained by `kdkit train` on its source alone), a shared 512-id byte-level BPE "
             "trained on both sources. Students: a 2-layer Llama from scratch, the same steps, batch, learning rate "
             "and seeds in every row; KD rows use 0.2 CE + 0.8 forward-KL token KD. Perplexity = exp(mean "
             "next-token NLL) on each source's held-out test blocks, measured by the bench on the saved student "
             "(lower is better). Variants: `none` no teacher; `one` the GSM8K specialist on every text; `mean` / "
             "`learned` both teachers' distributions mixed with uniform / trained weights; `route` each text's own "
             "specialist (`llm.multi_teacher.mix=route route_by=source`). No paper reports this setting, so there "
             "is no published column.", ""]
    groups: dict = {}
    for r in rows:
        groups.setdefault(json.dumps(r["setting"], sort_keys=True), []).append(r)
    for key, group in groups.items():
        s = json.loads(key)
        hw = group[0]["hardware"]
        t = group[0]["teacher_ppl"]
        where = f"blocks of {s['block_size']} tokens ({hw['device']}, {hw['cpu']}, {s['threads']} threads)"
        title = (f"## SmolLM2 scale: SmolLM2-135M-Instruct (GSM8K) and {s['specialist']} (chain sums) into a "
                 f"15-layer truncation, `data.name=gsm8k+chain_sum`, {s['steps']} student steps, {where}"
                 if s.get("scale") == "smollm2" else
                 f"## {s['texts']} training texts per source, {s['steps']} student steps, {where}")
        lines += [title, "",
                  "Teachers: " + "; ".join(f"{name} specialist: " + ", ".join(f"{src} {v:.2f}" for src, v in p.items())
                                           for name, p in t.items()), "",
                  "| variant | seeds | ppl GSM8K | ppl chain sums | mean of the two | learned weights (last seed) "
                  "| wall s / run | command |", "|---|---|---|---|---|---|---|---|"]
        order = {v: i for i, v in enumerate(VARIANTS)}
        by_variant: dict = {}
        for r in group:
            by_variant.setdefault(r["variant"], []).append(r)
        for variant in sorted(by_variant, key=order.get):
            rs = sorted(by_variant[variant], key=lambda r: r["seed"])
            g = [r["student_ppl"]["gsm8k"] for r in rs]
            c = [r["student_ppl"]["chain_sum"] for r in rs]
            both = [(a + b) / 2 for a, b in zip(g, c)]
            w = rs[-1].get("teacher_weights")
            lines.append(f"| {variant} | {len(rs)} | {mean_std(g)} | {mean_std(c)} | {mean_std(both)} | "
                         f"{'-' if not w else ', '.join(f'{x:.3f}' for x in w)} | "
                         f"{statistics.mean(r['wall_seconds'] for r in rs):.0f} | `{rs[0]['command']}` |")
        lines += ["", *_reading(by_variant), *_specialists(t), ""]
    path.write_text("\n".join(lines) + "\n")
    return path
