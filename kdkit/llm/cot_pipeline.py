"""`kdkit distill recipe=cot-math`: rationale distillation as five resumable stages in one run folder.

    generate  RUN/generate/rationales   N teacher rationales per training question (vLLM or transformers)
    filter    RUN/filter/{correct,incorrect} + stats.json
    sft       RUN/sft/data + RUN/sft/model (TRL SFTTrainer, kdkit's weighted loss, optional token KD)
    redi      RUN/redi/pairs + RUN/redi/model (correct vs incorrect traces, REDI)
    evaluate  RUN/eval/<model> predictions + RUN/report.{md,json}

A stage whose output exists is skipped on a rerun with the same run name (`name=...`), so an interrupted run
resumes at the stage (and, for generation, the shard; for SFT, the checkpoint) where it stopped. RUN/timings.json
sums each stage's wall seconds over every (re)run of the folder, so a resumed run still reports what it cost
(all but the attempt that crashed, whose time is not written).
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ..config import Recipe, dump
from ..errors import ConfigError
from .cot_generate import dataset_done, load_dataset, save_dataset
from .generation import SamplingSpec, VLLMNotInstalledError, make_backend

log = logging.getLogger(__name__)


def _done(folder: Path) -> bool:
    return dataset_done(folder) or (folder / "config.json").is_file()


class CoTDistill:
    """The rationale-distillation method: `fit()` runs the stages that are not done yet and returns the summary."""

    def __init__(self, recipe: Recipe, run_dir: Path):
        if recipe.task != "cot":
            raise ConfigError(f"CoTDistill runs task: cot recipes, not task: {recipe.task}")
        if not recipe.teacher.model:
            raise ConfigError("rationale distillation needs teacher.model (the model that writes rationales)")
        self.r, self.c, self.run_dir = recipe, recipe.cot, Path(run_dir)
        self.cpu = recipe.trainer.cpu or not torch.cuda.is_available()
        self.device = "cpu" if self.cpu else "cuda"
        if recipe.trainer.threads:
            torch.set_num_threads(recipe.trainer.threads)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        dump(recipe, self.run_dir / "config.yaml")
        self._teacher = None

    # ------------------------------------------------------------ pieces

    def questions(self, split: str):
        from ..data.gsm8k import load_gsm8k

        if self.r.data.name != "gsm8k":
            raise ConfigError(f"rationale distillation reads GSM8K-style data (question, answer '#### N'); "
                              f"data.name={self.r.data.name!r} is not supported yet")
        ds = load_gsm8k(split)
        limit = self.c.train_questions if split == "train" else self.c.test_questions
        return ds.select(range(min(limit, len(ds)))) if limit else ds

    def teacher(self):
        """(model, tokenizer) of the teacher, loaded once (student init, KD, prompts)."""
        if self._teacher is None:
            from .models import load_causal_lm

            self._teacher = load_causal_lm(self.r.teacher.model, dtype=self.r.llm.dtype, device=self.device)
        return self._teacher

    def tokenizer(self):
        from .models import load_tokenizer

        return load_tokenizer(self.r.teacher.model)

    def backend(self, model: str, name: str | None = None):
        name = name or self.c.backend
        try:
            return make_backend(name, model, batch_size=self.r.data.eval_batch_size)
        except VLLMNotInstalledError:
            if not self.c.fallback_to_transformers:
                raise
            log.warning("vllm is not importable here; generating with transformers (cot.fallback_to_transformers)")
            return make_backend("transformers", model, batch_size=self.r.data.eval_batch_size)

    def student_prompt(self, tokenizer, question: str, for_eval: bool = True) -> str:
        from .cot_generate import question_prompt
        from .cot_sft import eval_instruction, eval_prefix

        mode = self.c.sft
        return question_prompt(tokenizer, question, eval_instruction(mode, self.c.instruction), eval_prefix(mode))

    # ------------------------------------------------------------ stages

    def generate(self):
        from .cot_generate import generate_rationales

        out = self.run_dir / "generate"
        if self.c.generations:
            src = Path(self.c.generations)
            src = src / "generate" if (src / "generate").is_dir() else src
            if not _done(src / "rationales"):
                raise ConfigError(f"cot.generations={self.c.generations}: no finished generation stage there "
                                  "(expected RUN/generate/rationales)")
            return load_dataset(src / "rationales")
        if _done(out / "rationales"):
            return load_dataset(out / "rationales")
        spec = SamplingSpec(n=self.c.samples, temperature=self.c.temperature, top_p=self.c.top_p,
                            max_new_tokens=self.c.max_new_tokens, seed=self.r.trainer.seed)
        return generate_rationales(self.questions("train"), self.tokenizer(),
                                   lambda: self.backend(self.r.teacher.model), out, spec, self.c.instruction,
                                   self.c.shard_size, progress=self.r.trainer.progress)

    def filter(self, rows):
        from .cot_filter import filter_rationales

        out = self.run_dir / "filter"
        if _done(out / "correct") and _done(out / "incorrect"):
            return (load_dataset(out / "correct"), load_dataset(out / "incorrect"),
                    json.loads((out / "stats.json").read_text()))
        correct, incorrect, stats = filter_rationales(rows)
        out.mkdir(parents=True, exist_ok=True)
        save_dataset(correct, out / "correct")
        save_dataset(incorrect, out / "incorrect")
        (out / "stats.json").write_text(json.dumps(stats, indent=1))
        log.info("teacher rationales: %s", stats)
        return correct, incorrect, stats

    def build_student(self):
        from .models import load_tokenizer
        from .students import build_student

        s = self.r.student
        teacher, t_tok = self.teacher() if s.model in ("truncated-teacher", "scratch") else (None, None)
        student = build_student(s, teacher, self.r.llm, self.r.llm.dtype).to(self.device)
        tok = t_tok if t_tok is not None else load_tokenizer(s.model)
        if not getattr(tok, "chat_template", None):
            raise ConfigError(f"the student's tokenizer ({s.model}) has no chat template, so it cannot be trained "
                              "on chat prompts: use an instruction-tuned student or set tokenizer.chat_template")
        return student, tok

    def save_model(self, model, tokenizer, folder: Path) -> Path:
        from .students import merge_lora

        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        merged = merge_lora(model)
        merged.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        return folder

    def sft(self, correct, student, tok):
        from .cot_sft import build_sft_examples, run_sft

        out = self.run_dir / "sft"
        if _done(out / "model"):
            return out / "model", json.loads((out / "sft.json").read_text())
        if _done(out / "data"):
            examples = load_dataset(out / "data")
        else:
            examples = build_sft_examples(correct, self.questions("train"), self.c.sft, self.c.instruction,
                                          rationale_weight=self.c.rationale_weight, short_ratio=self.c.short_ratio,
                                          seed=self.r.trainer.seed)
            save_dataset(examples, out / "data")
        teacher = None
        if self.c.kd_weight > 0:
            from .tokenizers import require_same_tokenizer

            teacher, t_tok = self.teacher()
            require_same_tokenizer(t_tok, tok)
        stats = run_sft(student, tok, examples, out / "checkpoints", epochs=self.c.sft_epochs, lr=self.r.optim.lr,
                        batch_size=self.r.data.batch_size, max_length=self.c.max_length, seed=self.r.trainer.seed,
                        teacher=teacher, kd_weight=self.c.kd_weight, kd_divergence=self.c.kd_divergence,
                        progress=self.r.trainer.progress, cpu=self.cpu)
        (out / "sft.json").write_text(json.dumps(stats, indent=1, default=str))
        return self.save_model(student, tok, out / "model"), stats

    def redi(self, correct, incorrect, sft_model: Path):
        import datasets

        from .models import load_causal_lm
        from .redi import build_pairs, run_redi

        out = self.run_dir / "redi"
        if _done(out / "model"):
            return out / "model", json.loads((out / "redi.json").read_text())
        from .cot_sft import reference_rationale, with_answer_sentence

        # the teacher's correct traces end the way SFT trained on them: one canonical "The answer is N." line
        correct = {"question_id": correct["question_id"],
                   "rationale": [with_answer_sentence(t, g) for t, g in zip(correct["rationale"], correct["gold"])]}
        references = None
        if self.c.redi_reference_positives:
            train = self.questions("train")
            references = {i: reference_rationale(a, g) for i, (a, g) in enumerate(zip(train["answer"],
                                                                                        train["final_answer"]))}
        pairs = build_pairs(correct, incorrect, seed=self.r.trainer.seed, references=references)
        out.mkdir(parents=True, exist_ok=True)
        cols = ("question_id", "question", "positive", "negative", "positive_source")
        save_dataset(datasets.Dataset.from_dict({c: [p[c] for p in pairs] for c in cols}), out / "pairs")
        model, tok = load_causal_lm(sft_model, device=self.device)
        model.requires_grad_(True)
        from .cot_generate import question_prompt

        stats = run_redi(model, tok, pairs, lambda q: question_prompt(tok, q, self.c.instruction),
                         alpha=self.c.redi_alpha, epochs=self.c.redi_epochs,
                         lr=self.c.redi_lr or self.r.optim.lr / 2, batch_size=self.r.data.batch_size,
                         max_length=self.c.max_length, seed=self.r.trainer.seed, device=self.device,
                         progress=self.r.trainer.progress)
        stats["reference_positives"] = sum(p["positive_source"] == "reference" for p in pairs)
        (out / "redi.json").write_text(json.dumps(stats, indent=1))
        return self.save_model(model, tok, out / "model"), stats

    def evaluate(self, name: str, model: str | Path, prompt_for) -> dict:
        from .cot_eval import evaluate_accuracy
        from .models import load_tokenizer

        out = self.run_dir / "eval" / name
        summary = out.with_suffix(".json")
        if summary.is_file():
            return json.loads(summary.read_text())
        test = self.questions("test")
        tok = load_tokenizer(model)
        prompts = [prompt_for(tok, q) for q in test["question"]]
        backend = self.backend(str(model), "transformers" if name != "teacher" else None)
        m = evaluate_accuracy(backend, prompts, list(test["final_answer"]), self.c.eval_max_new_tokens, out)
        m.pop("rows")
        summary.write_text(json.dumps(m, indent=1))
        return m

    # ------------------------------------------------------------ the run

    @contextmanager
    def timed(self, stage: str):
        """Add this stage's wall seconds to RUN/timings.json once it finishes."""
        t0 = time.perf_counter()
        yield
        path = self.run_dir / "timings.json"
        seconds = json.loads(path.read_text()) if path.is_file() else {}
        seconds[stage] = round(seconds.get(stage, 0.0) + time.perf_counter() - t0, 2)
        path.write_text(json.dumps(seconds, indent=1))

    def fit(self) -> dict:
        from .cot_eval import write_report
        from .cot_generate import question_prompt

        needs_rationales = self.c.sft != "answer_only" or self.c.redi
        correct = incorrect = stats = None
        if needs_rationales:
            with self.timed("generate"):
                rows = self.generate()
            with self.timed("filter"):
                correct, incorrect, stats = self.filter(rows)
        with self.timed("student"):
            student, tok = self.build_student()
            before = self.run_dir / "student_before"
            if not _done(before):
                self.save_model(student, tok, before)
        with self.timed("sft"):
            sft_model, sft_stats = self.sft(correct, student, tok)
        del student
        redi_model = redi_stats = None
        if self.c.redi and self.c.sft == "rationale":
            with self.timed("redi"):
                redi_model, redi_stats = self.redi(correct, incorrect, sft_model)
        accuracy = {}
        student_prompt = lambda t, q: self.student_prompt(t, q)  # noqa: E731
        evals = [("teacher", "teacher", self.r.teacher.model, lambda t, q: question_prompt(t, q, self.c.instruction),
                  self.c.eval_teacher),
                 ("student_before", "student_before", before, student_prompt, self.c.eval_student_before),
                 (f"student_sft_{self.c.sft}", "student_sft", sft_model, student_prompt, True),
                 ("student_sft_redi", "student_redi", redi_model, student_prompt, redi_model is not None)]
        for key, name, model, prompt_for, wanted in evals:
            if wanted:
                with self.timed(f"eval_{name}"):
                    accuracy[key] = self.evaluate(name, model, prompt_for)
        report = {"teacher": self.r.teacher.model, "student": self.r.student.model, "sft": self.c.sft,
                  "test_questions": len(self.questions("test")), "accuracy": accuracy, "sft_stats": sft_stats,
                  "redi_stats": {k: v for k, v in (redi_stats or {}).items() if k != "history"} or None,
                  "stage_seconds": json.loads((self.run_dir / "timings.json").read_text())}
        if stats is not None:
            report["filter"] = stats
        last = "student_redi" if redi_model is not None else "student_sft"
        rows = load_dataset(self.run_dir / "eval" / last)
        picks = [r for r in rows if r["correct"]][: self.c.examples_in_report]
        picks += [r for r in rows if not r["correct"]][: max(0, self.c.examples_in_report - len(picks))]
        write_report(self.run_dir, report, {last: picks})
        summary = {k: v["accuracy"] for k, v in accuracy.items()}
        (self.run_dir / "metrics.json").write_text(json.dumps({"summary": summary, "report": report}, indent=1,
                                                              default=str))
        return summary


def check_recipe(recipe: Recipe, mode: str) -> None:
    """Every rule of a CoT recipe that needs no data or model (what `--dry-run` checks too)."""
    if mode != "distill":
        raise ConfigError("task: cot recipes run with `kdkit distill`")
    if not recipe.teacher.model:
        raise ConfigError("rationale distillation needs teacher.model (the model that writes rationales)")


def run_recipe(recipe: Recipe, mode: str, recipe_name: str | None = None):
    """`kdkit distill` for a CoT recipe: (run folder, summary)."""
    from ..train.build import run_name

    run_dir = Path(recipe.output_dir) / run_name(recipe, recipe_name)
    return run_dir, CoTDistill(recipe, run_dir).fit()
