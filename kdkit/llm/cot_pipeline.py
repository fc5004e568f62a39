"""`kdkit distill recipe=cot-math`: rationale distillation, the method `cot` of the distill pillar. Each stage
is one step of the shared loop (`kdkit.method.fit`) in a `kdkit.run.Run`:

    generate  RUN/generate/rationales   N teacher rationales per training question (vLLM or transformers)
    filter    RUN/filter/{correct,incorrect} + stats.json
    student   RUN/student_before        the untrained student (its accuracy is the baseline)
    sft       RUN/sft/data + RUN/sft/model (TRL SFTTrainer, kdkit's weighted loss, optional token KD)
    redi      RUN/redi/pairs + RUN/redi/model (correct vs incorrect traces, REDI)

then, as the method's artefacts, `evaluate`: RUN/eval/<model> predictions, RUN/report.{md,json}, metrics.json.
The run folder has the one layout (config.yaml, metrics.jsonl with a row per stage and the accuracies, train.log,
checkpoints/step-N/ holding which stages finished and what they produced). Stages that a recipe does not need
are not steps (answer-only SFT without REDI generates nothing).

Resume: a rerun with the same `name=` continues the run (`resume=auto` is the default here): finished stages are
skipped, and changed training settings are refused naming old -> new (`Recipe.RESUME_MAY_CHANGE` lists the free
ones; an evaluation whose settings changed is redone). Inside a stage, generation resumes at its first missing
shard, SFT from TRL's last checkpoint, REDI from its own. Ctrl-C: the stage saves where it is (finished shards,
a TRL checkpoint, a REDI checkpoint), the run stops with exit code 130, and the same command continues it.
RUN/timings.json sums each stage's wall seconds over every (re)run of the folder, so a resumed run still reports
what it cost (all but an attempt that crashed, whose time is not written).
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..config import CoTConfig, Recipe, to_plain
from ..errors import ConfigError
from ..method import Method, register_method
from ..run import Interrupted, Run
from .cot_generate import dataset_done, load_dataset, save_dataset
from .generation import SamplingSpec, VLLMNotInstalledError, make_backend

log = logging.getLogger(__name__)


def _done(folder: Path) -> bool:
    return dataset_done(folder) or (folder / "config.json").is_file()


def generations_folder(path: str | Path) -> Path | None:
    """The finished `rationales` dataset of a run folder or its `generate` folder (`cot.generations`), or None."""
    src = Path(path)
    src = src / "generate" if (src / "generate").is_dir() else src
    return src / "rationales" if _done(src / "rationales") else None


COT_DATASETS = ("gsm8k", "chain_sum")  # question / answer (a rationale ending in '#### N') / final_answer


def stages_of(c: CoTConfig) -> tuple[str, ...]:
    """The steps a recipe runs, in order: rationales only when something trains on them, REDI after rationale
    SFT only; `reference` SFT (teacher training) needs no teacher."""
    if c.sft == "reference":
        return ("student", "sft")
    needs_rationales = c.sft != "answer_only" or c.redi
    return ((("generate", "filter") if needs_rationales else ()) + ("student", "sft")
            + (("redi",) if c.redi and c.sft == "rationale" else ()))


class _Stopped(Exception):
    """A stage saved its own progress after Ctrl-C and stopped before finishing."""


# data.eval_batch_size is the teacher's generation batch here: changing it mid-generation changes the samples
COT_RESUME_MAY_CHANGE = tuple(k for k in Recipe.RESUME_MAY_CHANGE if k != "data.eval_batch_size")


class CoTDistill(Method):
    """Rationale distillation: one step per stage (see the module docstring); `artefacts` evaluates and reports."""

    name = "cot"
    log_every = 1
    save_every = 1

    def __init__(self, recipe: Recipe, cot: CoTConfig):
        if not recipe.teacher.model and cot.sft != "reference":
            raise ConfigError("rationale distillation needs teacher.model (the model that writes rationales)")
        self.r, self.c = recipe, cot
        self.stages = stages_of(cot)
        self.total_steps = len(self.stages)
        self.finished = 0  # stages done
        self.results: dict[str, dict] = {}  # stage -> what it produced (folders, stats)
        self.cpu = recipe.trainer.cpu or not torch.cuda.is_available()
        self.device = "cpu" if self.cpu else "cuda"
        self.run: Run | None = None
        self._teacher = None
        self._student = None

    # ------------------------------------------------------------ the method contract

    def prepare(self, run: Run, resuming: bool) -> None:
        self.run, self.run_dir = run, run.run_dir

    def step(self, batch) -> dict:
        stage = self.stages[self.finished]
        self.run.log(f"cot: stage {stage} ({self.finished + 1} of {self.total_steps})")
        t0 = time.perf_counter()
        try:
            with self.timed(stage):
                self.results[stage], logs = getattr(self, f"stage_{stage}")()
        except _Stopped:  # the stage kept its progress; the run's checkpoint says which stages are done
            raise Interrupted(self.finished, self.run.save(self.finished, self.state_dict()), self.run_dir) from None
        self.finished += 1
        return {f"{stage}_seconds": time.perf_counter() - t0, **logs}

    def state_dict(self) -> dict:
        return {"finished": self.finished, "stages": list(self.stages), "results": self.results}

    def load_state_dict(self, state: dict) -> None:
        self.finished, self.results = int(state["finished"]), dict(state["results"])

    def artefacts(self, run: Run) -> dict:
        """Evaluate every model of the run (each cached in RUN/eval/<model>.json with the settings it used), then
        write report.{md,json} and metrics.json; returns {model: accuracy}."""
        with run.interruptible():
            return self.report(run)

    # ------------------------------------------------------------ pieces

    def bf16(self) -> bool:
        """bfloat16 autocast in SFT: on a GPU always (as before), on a CPU when trainer.mixed_precision=bf16."""
        return not self.cpu or self.r.trainer.mixed_precision == "bf16"

    def should_stop(self) -> bool:
        return bool(self.run is not None and self.run.interrupted)

    def questions(self, split: str):
        from ..data import load_dataset_by_name
        from .prompt_records import is_prompt_source, load_prompt_records

        name = self.r.data.name
        ds = load_prompt_records(name, split) if is_prompt_source(name) else load_dataset_by_name(name, split)
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
        if name == "server":
            from .teacher_server import served_teacher

            if str(model) != str(self.r.teacher.model):
                raise ConfigError(f"cot.backend=server generates with the teacher on teacher.server; {model} is not "
                                  "the teacher")
            return served_teacher(self.r.teacher)
        try:
            return make_backend(name, model, batch_size=self.r.data.eval_batch_size)
        except VLLMNotInstalledError:
            if not self.c.fallback_to_transformers:
                raise
            log.warning("vllm is not importable here; generating with transformers (cot.fallback_to_transformers)")
            return make_backend("transformers", model, batch_size=self.r.data.eval_batch_size)

    def student_prompt(self, tokenizer, question: str) -> str:
        from .cot_generate import question_prompt
        from .cot_sft import eval_instruction, eval_prefix

        mode = self.c.sft
        return question_prompt(tokenizer, question, eval_instruction(mode, self.c.instruction), eval_prefix(mode))

    def build_student(self):
        """(student, tokenizer), built from the recipe's seed whenever it is built (a resumed run builds the
        same student as the run it continues)."""
        from .models import load_tokenizer
        from .students import build_student

        s = self.r.student
        teacher, t_tok = self.teacher() if s.model in ("truncated-teacher", "scratch") else (None, None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.r.trainer.seed)
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
        # TRL trains with the KV cache off and the flag is saved with the model: whoever generates from the
        # checkpoint (kdkit's evaluation, transformers users) would then recompute every prefix, 9x slower here
        merged.config.use_cache = True
        if merged.generation_config is not None:
            merged.generation_config.use_cache = True
        merged.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        return folder

    def filtered(self):
        """(correct, incorrect) rationales of the filter stage."""
        f = self.results["filter"]
        return load_dataset(f["correct"]), load_dataset(f["incorrect"])

    # ------------------------------------------------------------ stages: each returns (results, logs)

    def stage_generate(self):
        from .cot_generate import generate_rationales

        out = self.run_dir / "generate"
        if self.c.generations:
            src = generations_folder(self.c.generations)
            if src is None:  # checked before the run; gone since
                raise ConfigError(f"cot.generations={self.c.generations}: no finished generation stage there "
                                  "(expected RUN/generate/rationales)")
            rows = load_dataset(src)
        elif _done(out / "rationales"):
            rows = load_dataset(out / "rationales")
        else:
            spec = SamplingSpec(n=self.c.samples, temperature=self.c.temperature, top_p=self.c.top_p,
                                max_new_tokens=self.c.max_new_tokens, seed=self.r.trainer.seed)
            rows = generate_rationales(self.questions("train"), self.tokenizer(),
                                       lambda: self.backend(self.r.teacher.model), out, spec, self.c.instruction,
                                       self.c.shard_size, progress=self.r.trainer.progress,
                                       should_stop=self.should_stop)
            if rows is None:
                raise _Stopped
        where = generations_folder(self.c.generations) if self.c.generations else out / "rationales"
        return {"rationales": str(where), "rows": len(rows)}, {"rationales": len(rows)}

    def stage_filter(self):
        from .answer_checks import answer_check
        from .cot_filter import filter_rationales

        out = self.run_dir / "filter"
        if _done(out / "correct") and _done(out / "incorrect") and (out / "stats.json").is_file():
            stats = json.loads((out / "stats.json").read_text())
        else:
            correct, incorrect, stats = filter_rationales(load_dataset(self.results["generate"]["rationales"]),
                                                          answer_check(self.c.answer_check))
            out.mkdir(parents=True, exist_ok=True)
            save_dataset(correct, out / "correct")
            save_dataset(incorrect, out / "incorrect")
            (out / "stats.json").write_text(json.dumps(stats, indent=1))
        self.run.log(f"teacher rationales: {stats}")
        logs = {k: stats[k] for k in ("correct", "incorrect", "teacher_sample_accuracy")}
        return {"correct": str(out / "correct"), "incorrect": str(out / "incorrect"), "stats": stats}, logs

    def stage_student(self):
        before = self.run_dir / "student_before"
        if not _done(before):
            self._student = self.build_student()
            self.save_model(*self._student, before)
        return {"model": str(before)}, {}

    def stage_sft(self):
        from .cot_sft import build_sft_examples, run_sft

        out = self.run_dir / "sft"
        if not (_done(out / "model") and (out / "sft.json").is_file()):
            student, tok = self._student or self.build_student()
            if _done(out / "data"):
                examples = load_dataset(out / "data")
            else:
                correct = self.filtered()[0] if "filter" in self.results else None
                examples = build_sft_examples(correct, self.questions("train"), self.c.sft, self.c.instruction,
                                              rationale_weight=self.c.rationale_weight,
                                              short_ratio=self.c.short_ratio, seed=self.r.trainer.seed)
                save_dataset(examples, out / "data")
            teacher = None
            if self.c.kd_weight > 0:
                from .tokenizers import require_same_tokenizer

                if self.r.teacher.server:  # its top-k log-probs, scored once per sequence on the server
                    from .teacher_server import served_teacher

                    teacher = served_teacher(self.r.teacher)
                    t_tok = teacher.tokenizer
                else:
                    teacher, t_tok = self.teacher()
                require_same_tokenizer(t_tok, tok)
            stats = run_sft(student, tok, examples, out / "checkpoints", epochs=self.c.sft_epochs,
                            lr=self.r.optim.lr, batch_size=self.r.data.batch_size, max_length=self.c.max_length,
                            seed=self.r.trainer.seed, teacher=teacher, kd_weight=self.c.kd_weight,
                            kd_divergence=self.c.kd_divergence, kd_topk=self.c.kd_topk,
                            progress=self.r.trainer.progress, cpu=self.cpu,
                            should_stop=self.should_stop, bf16=self.bf16())
            if stats is None:
                raise _Stopped
            self.save_model(student, tok, out / "model")
            (out / "sft.json").write_text(json.dumps(stats, indent=1, default=str))
            self._student = None
        stats = json.loads((out / "sft.json").read_text())
        logs = {k: stats[k] for k in ("train_loss", "steps") if isinstance(stats.get(k), (int, float))}
        return {"model": str(out / "model"), "stats": stats}, logs

    def stage_redi(self):
        import datasets

        from .cot_generate import question_prompt
        from .cot_sft import reference_rationale, with_answer_sentence
        from .models import load_causal_lm
        from .redi import REDI_LR_RATIO, build_pairs, run_redi

        out = self.run_dir / "redi"
        if not (_done(out / "model") and (out / "redi.json").is_file()):
            correct, incorrect = self.filtered()
            # the teacher's correct traces end the way SFT trained on them: one canonical "The answer is N." line
            correct = {"question_id": correct["question_id"],
                       "rationale": [with_answer_sentence(t, g) for t, g in zip(correct["rationale"],
                                                                                correct["gold"])]}
            references = None
            if self.c.redi_reference_positives:
                train = self.questions("train")
                references = {i: reference_rationale(a, g)
                              for i, (a, g) in enumerate(zip(train["answer"], train["final_answer"]))}
            pairs = build_pairs(correct, incorrect, seed=self.r.trainer.seed, references=references)
            out.mkdir(parents=True, exist_ok=True)
            cols = ("question_id", "question", "positive", "negative", "positive_source")
            save_dataset(datasets.Dataset.from_dict({c: [p[c] for p in pairs] for c in cols}), out / "pairs")
            model, tok = load_causal_lm(self.results["sft"]["model"], device=self.device)
            model.requires_grad_(True)
            stats = run_redi(model, tok, pairs, lambda q: question_prompt(tok, q, self.c.instruction),
                             alpha=self.c.redi_alpha, epochs=self.c.redi_epochs,
                             lr=self.c.redi_lr or self.r.optim.lr / REDI_LR_RATIO, batch_size=self.r.data.batch_size,
                             max_length=self.c.max_length, seed=self.r.trainer.seed, device=self.device,
                             progress=self.r.trainer.progress, checkpoint_dir=out / "checkpoint",
                             save_steps=200, should_stop=self.should_stop)
            if stats is None:
                raise _Stopped
            stats["reference_positives"] = sum(p["positive_source"] == "reference" for p in pairs)
            self.save_model(model, tok, out / "model")
            (out / "redi.json").write_text(json.dumps(stats, indent=1))
            shutil.rmtree(out / "checkpoint", ignore_errors=True)
        stats = json.loads((out / "redi.json").read_text())
        last = stats["history"][-1] if stats.get("history") else {}
        logs = {"redi_pairs": stats["pairs"], **({"redi_loss": last["loss"]} if "loss" in last else {})}
        return {"model": str(out / "model"), "stats": {k: v for k, v in stats.items() if k != "history"}}, logs

    # ------------------------------------------------------------ evaluation and report

    def evaluate_model(self, name: str, model: str | Path, prompt_for, split: str = "test") -> dict:
        """Greedy accuracy of one model on `split`; RUN/eval/<name>[@split].json is reused while the evaluation
        settings it records are this run's."""
        from .answer_checks import answer_check
        from .cot_eval import evaluate_accuracy
        from .models import load_tokenizer

        out = self.run_dir / "eval" / (name if split == "test" else f"{name}@{split}")
        summary = out.with_suffix(".json")
        backend = "transformers" if name != "teacher" else self.c.backend
        settings = {"test_questions": self.c.test_questions, "max_new_tokens": self.c.eval_max_new_tokens,
                    "backend": backend, "data": self.r.data.name, "split": split, "answer_check": self.c.answer_check}
        if summary.is_file():
            saved = json.loads(summary.read_text())
            if saved.pop("settings", settings) == settings:  # a folder from before settings were recorded: its own
                return saved
        test = self.questions(split)
        tok = load_tokenizer(model)
        prompts = [prompt_for(tok, q) for q in test["question"]]
        m = evaluate_accuracy(self.backend(str(model), backend), prompts, list(test["final_answer"]),
                              self.c.eval_max_new_tokens, out, answer_check(self.c.answer_check))
        m.pop("rows")
        summary.write_text(json.dumps({**m, "settings": settings}, indent=1))
        return m

    def report(self, run: Run) -> dict:
        from .cot_eval import write_report
        from .cot_generate import question_prompt

        sft_model = self.results["sft"]["model"]
        redi_model = self.results.get("redi", {}).get("model")
        student_prompt = lambda t, q: self.student_prompt(t, q)  # noqa: E731
        evals = [("teacher", "teacher", self.r.teacher.model, lambda t, q: question_prompt(t, q, self.c.instruction),
                  self.c.eval_teacher and bool(self.r.teacher.model)),
                 ("student_before", "student_before", self.results["student"]["model"], student_prompt,
                  self.c.eval_student_before),
                 (f"student_sft_{self.c.sft}", "student_sft", sft_model, student_prompt, True),
                 ("student_sft_redi", "student_redi", redi_model, student_prompt, redi_model is not None)]
        accuracy = {}
        for key, name, model, prompt_for, wanted in evals:
            if not wanted:
                continue
            if run.interrupted:  # Ctrl-C during the previous evaluation: the finished ones are kept
                raise Interrupted(self.total_steps, ckpt.latest_checkpoint(self.run_dir), self.run_dir)
            for split in self.c.eval_splits:
                with self.timed(f"eval_{name}" if split == "test" else f"eval_{name}@{split}"):
                    accuracy[key if split == "test" else f"{key}@{split}"] = self.evaluate_model(
                        name, model, prompt_for, split)
        report = {"teacher": self.r.teacher.model, "student": self.r.student.model, "sft": self.c.sft,
                  "data": self.r.data.name, "test_questions": len(self.questions("test")),
                  "eval_questions": {split: len(self.questions(split)) for split in self.c.eval_splits},
                  "accuracy": accuracy,
                  "sft_stats": self.results["sft"]["stats"], "redi_stats": self.results.get("redi", {}).get("stats"),
                  "stage_seconds": json.loads((self.run_dir / "timings.json").read_text())}
        if "filter" in self.results:
            report["filter"] = self.results["filter"]["stats"]
        last = "student_redi" if redi_model is not None else "student_sft"
        rows = load_dataset(self.run_dir / "eval" / last)
        picks = [r for r in rows if r["correct"]][: self.c.examples_in_report]
        picks += [r for r in rows if not r["correct"]][: max(0, self.c.examples_in_report - len(picks))]
        write_report(self.run_dir, report, {last: picks})
        summary = {k: v["accuracy"] for k, v in accuracy.items()}
        run.record({"step": self.total_steps, **{f"accuracy/{k}": v for k, v in summary.items()}})
        run.write_json("metrics.json", {"summary": summary, "report": report})
        return summary

    @contextlib.contextmanager
    def timed(self, stage: str):
        """Add this stage's wall seconds to RUN/timings.json once it finishes (or stops cleanly on Ctrl-C)."""
        t0 = time.perf_counter()
        try:
            yield
        except (_Stopped, Interrupted):
            self._add_seconds(stage, time.perf_counter() - t0)
            raise
        self._add_seconds(stage, time.perf_counter() - t0)

    def _add_seconds(self, stage: str, seconds: float) -> None:
        path = self.run_dir / "timings.json"
        total = json.loads(path.read_text()) if path.is_file() else {}
        total[stage] = round(total.get(stage, 0.0) + seconds, 2)
        path.write_text(json.dumps(total, indent=1))


@register_method("distill", "cot")
def cot_method(ctx: Recipe, *, cot: CoTConfig | None = None) -> CoTDistill:
    """Rationale distillation of `ctx` (a `task: cot` recipe); its options are the recipe's `cot:` section."""
    return CoTDistill(ctx, cot if cot is not None else ctx.cot)


def check_recipe(recipe: Recipe, mode: str) -> None:
    """Every rule of a CoT recipe that needs no data or model (what `--dry-run` checks too)."""
    from ..config import bad_value
    from ..losses.token import DIVERGENCES
    from .answer_checks import answer_check
    from .generation_vllm import vllm_available
    from .models import check_lm_name
    from .prompt_records import is_prompt_source, load_prompt_records
    from .students import check_student

    c = recipe.cot
    if c.backend == "server" and not recipe.teacher.server:
        raise ConfigError("cot.backend=server generates through the teacher's server: set teacher.server=URL "
                          "(start one with `kdkit serve-teacher MODEL`)")
    if recipe.teacher.server and c.backend != "server":
        raise ConfigError(f"teacher.server is set but cot.backend={c.backend} would load the teacher here; set "
                          "cot.backend=server")
    if recipe.teacher.server and c.kd_weight > 0 and not 0 < c.kd_topk <= recipe.teacher.server_k:
        raise ConfigError(f"cot.kd_weight > 0 with teacher.server learns from the served top-k log-probs: set "
                          f"cot.kd_topk to a k in 1..teacher.server_k={recipe.teacher.server_k} (got "
                          f"{c.kd_topk}; 0 means the full logits, which stay on the server)")
    if mode == "train" and c.sft != "reference":
        raise ConfigError(f"`kdkit train` with a task: cot recipe fine-tunes student.model on the dataset's own "
                          f"rationales: set cot.sft=reference (got {c.sft}), or run `kdkit distill`")
    if mode == "distill" and c.sft == "reference":
        raise ConfigError("cot.sft=reference trains on the dataset's rationales with no teacher: run it with "
                          "`kdkit train` (e.g. kdkit train recipe=cot-chainsum-teacher)")
    if not recipe.teacher.model and c.sft != "reference":
        raise ConfigError("rationale distillation needs teacher.model (the model that writes rationales)")
    if recipe.teacher.cache:
        raise ConfigError("rationale distillation generates text with a live teacher; teacher.cache (a stored "
                          "teacher signal) is for `task: lm` recipes")
    if recipe.teachers or recipe.peer:
        raise ConfigError("rationale distillation takes one teacher (teacher.model); teachers:/peer: are classifier "
                          "options")
    if c.kd_divergence not in DIVERGENCES:
        raise bad_value("cot.kd_divergence", c.kd_divergence, f"one of {', '.join(DIVERGENCES)}")
    try:
        if recipe.teacher.model:
            check_lm_name(recipe.teacher.model, "teacher.model")
        check_student(recipe.student, bool(recipe.teacher.model), recipe.llm)
    except ConfigError as e:
        if "not in the local Hugging Face cache" not in str(e):
            raise
        raise ConfigError(f"{e}. Offline, name models that ship with kdkit's packages, e.g. "
                          "teacher.model=smollm2-135m-instruct student.model=smollm2-135m-instruct, or run the CPU "
                          "benchmark: kdkit bench cot recipe=cot-chainsum teacher_recipe=cot-chainsum-teacher") from None
    if recipe.trainer.mixed_precision == "fp16":
        raise bad_value("trainer.mixed_precision", "fp16", "no or bf16 for rationale distillation (bf16: autocast "
                        "in SFT, on a CPU too)")
    answer_check(c.answer_check)  # an unknown check or a user function that does not import: one line, now
    if not c.eval_splits:
        raise bad_value("cot.eval_splits", c.eval_splits, "a non-empty list (usually [test])")
    if is_prompt_source(recipe.data.name):
        if recipe.data.name.startswith("jsonl:"):  # every record read now: a bad one is named before any work
            for split in dict.fromkeys(["train", *c.eval_splits]):
                load_prompt_records(recipe.data.name, split)
    elif recipe.data.name not in COT_DATASETS:
        raise ConfigError(f"data.name={recipe.data.name!r} is not supported by rationale distillation: choose one "
                          f"of {', '.join(COT_DATASETS)}, jsonl:PATH (chat, ShareGPT or Alpaca records) or "
                          "hf:<dataset>")
    else:
        splits = {"gsm8k": ("test",), "chain_sum": ("test", "hard")}[recipe.data.name]
        for split in c.eval_splits:
            if split not in splits:
                raise bad_value("cot.eval_splits", c.eval_splits, f"a list of {', '.join(splits)} (for "
                                f"data.name={recipe.data.name})")
    if c.generations is not None and generations_folder(c.generations) is None:
        raise ConfigError(f"cot.generations={c.generations!r} is not a finished generation stage: expected a run "
                          "folder (or its generate/ folder) holding generate/rationales")
    generates = "generate" in stages_of(c) and c.generations is None
    if c.backend == "vllm" and (generates or c.eval_teacher) and not c.fallback_to_transformers \
            and not vllm_available():
        raise ConfigError("cot.backend='vllm' but this Python cannot import vllm: set cot.backend=transformers, "
                          "cot.fallback_to_transformers=true, or run with a Python that has vllm (`make vllm-env`)")


def run_recipe(recipe: Recipe, mode: str, recipe_name: str | None = None):
    """`kdkit distill` for a CoT recipe: (run folder, {model: accuracy}). A rerun with the same `name=` continues
    the run folder's newest checkpoint (resume=auto) unless `resume=` says otherwise."""
    from ..method import build_method, fit
    from ..run import run_folder

    t = recipe.trainer
    run_dir = run_folder(recipe.output_dir, recipe.name, recipe_name or "run")
    run = Run(recipe, run_dir, resume=recipe.resume or "auto", seed=t.seed, device="cpu" if t.cpu else "auto",
              threads=t.threads, progress=t.progress, keep_checkpoints=t.keep_checkpoints,
              may_change=COT_RESUME_MAY_CHANGE)
    method = build_method("distill", "cot", recipe, {"cot": to_plain(recipe.cot)})
    return run_dir, fit(run, method)
