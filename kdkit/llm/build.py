"""Recipe (task: lm) -> teacher, student, token blocks, losses -> LMDistiller: what `kdkit distill|train` run for LMs."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ConfigError, Recipe, dump
from ..losses import LOSSES
from ..train.build import Mode, build_losses, run_name
from ..train.distiller import use_cpu

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STUDENT_FROM_TEACHER = ("truncated-teacher", "scratch")


def check_lm_mode(recipe: Recipe, mode: Mode) -> None:
    """`train`: CE only (teachers, no-teacher baselines); the teacher may be named only as the source a
    truncated student is cut from. `distill`: at least one loss, and a teacher (live or stored) for it."""
    losses = {k: v for k, v in recipe.losses.items() if v is not None}
    has_teacher = bool(recipe.teacher.model or recipe.teacher.cache)
    if recipe.teachers or recipe.peer:
        raise ConfigError("LM recipes take one teacher (teacher.model) or a stored signal (teacher.cache); "
                          "teachers:/peer: are classifier options")
    if mode == "train":
        if losses:
            raise ConfigError(f"`kdkit train` runs no distillation loss, but the recipe has {sorted(losses)}: use "
                              "`kdkit distill`, or override losses={} for the no-teacher baseline")
        if recipe.teacher.cache:
            raise ConfigError("`kdkit train` uses no teacher signal; drop teacher.cache")
        if recipe.teacher.model and recipe.student.model not in STUDENT_FROM_TEACHER:
            raise ConfigError(f"`kdkit train` has no teacher; teacher.model={recipe.teacher.model} is only allowed "
                              "as the model a truncated-teacher/scratch student is built from")
        return
    if not losses:
        raise ConfigError("`kdkit distill` needs at least one loss, e.g. losses.kd.type=token_kd; "
                          f"choices: {', '.join(LOSSES.names())}")
    if not has_teacher:
        raise ConfigError("LM distillation needs teacher.model (a model name or folder, e.g. smollm2-135m-instruct) "
                          "or teacher.cache (a teacher-signal store folder)")
    built = build_losses(recipe, {"epochs": recipe.trainer.epochs})  # option values checked before any work
    if recipe.teacher.cache:
        other = sorted(n for n, (_, l) in built.items() if type(l).__name__ != "TokenKDLoss")
        if other:
            raise ConfigError(f"a stored teacher signal (teacher.cache) trains token_kd losses only; {other} need the "
                              "live teacher's logits (set teacher.model)")
    cross = sorted(n for n, (_, l) in built.items() if type(l).__name__ == "CrossTokenizerLoss")
    if cross:
        other = sorted(set(built) - set(cross))
        if other:
            raise ConfigError(f"{cross} (cross_tokenizer) compares text chunks across vocabularies and runs with no "
                              f"token-level loss; {other} compare next-token distributions position by position")
        if recipe.teacher.cache or not recipe.teacher.model:
            raise ConfigError("cross_tokenizer needs a live teacher (teacher.model): a stored signal holds one "
                              "tokenizer's positions")
        if recipe.llm.on_policy.fraction > 0 or recipe.llm.fused:
            raise ConfigError("cross_tokenizer runs without llm.fused and llm.on_policy (set them to false / 0)")
    if recipe.teacher.cache and recipe.llm.on_policy.fraction > 0:
        raise ConfigError("on-policy distillation (llm.on_policy.fraction > 0) needs a live teacher to score the "
                          "student's own text; a stored signal only covers the stored blocks")


def _scratch_without_teacher(options: dict, dtype):
    """A randomly initialised LM from `options`: {tokenizer: NAME-or-folder, config: {model_type: llama, ...}}."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .models import resolve_lm

    if "tokenizer" not in options or "config" not in options:
        raise ConfigError("student.model=scratch without a teacher needs student.options.tokenizer (a model name "
                          "or folder) and student.options.config (e.g. {model_type: llama, hidden_size: 256, ...})")
    where = Path(options["tokenizer"])  # a tokenizer folder, or any model name resolve_lm knows
    tok = AutoTokenizer.from_pretrained(str(where if where.is_dir() else resolve_lm(options["tokenizer"])))
    cfg = dict(options["config"])
    kind = cfg.pop("model_type", "llama")
    cfg.setdefault("vocab_size", len(tok))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tok, name, None) is not None:
            cfg.setdefault(name, getattr(tok, name))
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **cfg), dtype=dtype)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def cross_tokenizer_loss(recipe: Recipe) -> str | None:
    """The name of the recipe's cross_tokenizer loss, if it has one."""
    return next((n for n, e in recipe.losses.items() if e is not None and e.get("type", n) == "cross_tokenizer"), None)


def build_lm_models(recipe: Recipe, mode: Mode):
    """(teacher or None, student, student tokenizer, teacher tokenizer or None): the student shares the teacher's
    tokenizer unless a cross_tokenizer loss says not."""
    from .models import load_causal_lm, load_tokenizer
    from .students import build_student
    from .tokenizers import require_same_tokenizer

    dtype = DTYPES[recipe.llm.dtype]
    teacher, t_tok = None, None
    if recipe.teacher.model:
        teacher, t_tok = load_causal_lm(recipe.teacher.model, dtype=recipe.llm.dtype)
        teacher.requires_grad_(False)
    s = recipe.student
    own_tokenizer = s.model == "scratch" and "tokenizer" in (s.options or {})  # e.g. for cross-tokenizer KD
    if s.model in STUDENT_FROM_TEACHER and teacher is not None and not own_tokenizer:
        student, tok = build_student(s, teacher, recipe.llm, dtype), t_tok
    elif s.model == "scratch":
        student, tok = _scratch_without_teacher(s.options, dtype)
        if recipe.llm.lora is not None:
            raise ConfigError("llm.lora on a randomly initialised student trains almost nothing; drop llm.lora")
    elif s.model == "truncated-teacher":
        raise ConfigError("student.model=truncated-teacher needs teacher.model (the model to cut layers from)")
    else:
        tok = load_tokenizer(s.model)
        student = build_student(s, teacher, recipe.llm, dtype)
    if mode == "train" and teacher is not None:
        teacher = None  # only the source of the student's initial weights
    if t_tok is not None and mode == "distill" and cross_tokenizer_loss(recipe) is None:
        require_same_tokenizer(t_tok, tok)
    return teacher, student, tok, t_tok


def build_lm_blocks(recipe: Recipe, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and evaluation token blocks [n, block_size] from the recipe's text dataset."""
    from .text_data import load_texts, pack_blocks

    lc = recipe.llm
    train = load_texts(recipe.data.name, "train", text_field=lc.text_field, limit=lc.train_examples)
    test = load_texts(recipe.data.name, "test", text_field=lc.text_field, limit=lc.eval_examples)
    return pack_blocks(train, tokenizer, lc.block_size), pack_blocks(test, tokenizer, lc.block_size)


def build_lm_distiller(recipe: Recipe, mode: Mode, recipe_name: str | None = None, on_step=None):
    from accelerate import PartialState
    from accelerate.utils import set_seed

    from .distiller import LMDistiller

    check_lm_mode(recipe, mode)
    state = PartialState(cpu=use_cpu(recipe))
    run_dir = Path(recipe.output_dir) / run_name(recipe, recipe_name)
    set_seed(recipe.trainer.seed)
    with state.main_process_first():
        teacher, student, tok, t_tok = build_lm_models(recipe, mode)
        train, test = build_lm_blocks(recipe, tok)
    if mode == "distill" and recipe.llm.on_policy.backend == "trl":
        if cross_tokenizer_loss(recipe) is not None:
            raise ConfigError("llm.on_policy.backend=trl has no cross-tokenizer loss; use backend=kdkit")
        if state.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            dump(recipe, run_dir / "config.yaml")
        return TRLGKDRun(recipe, run_dir, teacher, student, tok)
    store = None
    if mode == "distill" and recipe.teacher.cache:
        from .signal_store import open_signal_store

        store = open_signal_store(recipe.teacher.cache, tokenizer=tok, streaming=False)
        train = store.blocks()
    losses = build_losses(recipe, {"epochs": recipe.trainer.epochs}) if mode == "distill" else {}
    cross = None
    if mode == "distill" and cross_tokenizer_loss(recipe) is not None:
        cross = _cross_tokenizer_data(recipe, t_tok, tok, losses[cross_tokenizer_loss(recipe)][1])
        train = None
    meta = {"teacher": recipe.teacher.model or recipe.teacher.cache, "student": recipe.student.model,
            "student_options": json.dumps(recipe.student.options), "data": recipe.data.name,
            "block_size": recipe.llm.block_size}
    distiller = LMDistiller(recipe, run_dir, student, tok, train, test, teacher=teacher, losses=losses,
                            store=store, on_step=on_step, meta=meta, cross=cross)
    if state.is_main_process:
        dump(recipe, run_dir / "config.yaml")
    if recipe.resume:
        where = run_dir if recipe.resume == "auto" else Path(recipe.resume)
        if not distiller.resume(where) and recipe.resume != "auto":
            raise ConfigError(f"resume={recipe.resume}: no checkpoint found there")
    return distiller


def _cross_tokenizer_data(recipe: Recipe, teacher_tok, student_tok, loss) -> dict:
    """Whole training texts (each cut to llm.block_size tokens on either side), their chunk aligner, and the
    evaluation text in the teacher's tokens (its perplexity is reported over its own tokens)."""
    from .cross_tokenizer import CrossTokenizerBatcher
    from .text_data import load_texts, pack_blocks

    lc = recipe.llm
    texts = load_texts(recipe.data.name, "train", text_field=lc.text_field, limit=lc.train_examples)
    test = load_texts(recipe.data.name, "test", text_field=lc.text_field, limit=lc.eval_examples)
    return {"texts": texts, "batcher": CrossTokenizerBatcher(teacher_tok, student_tok, lc.block_size,
                                                             chunks=loss.chunks),
            "teacher_eval_blocks": pack_blocks(test, teacher_tok, lc.block_size)}


def write_store_from_recipe(recipe: Recipe, settings: dict) -> Path:
    """`kdkit teacher-signal`: run the recipe's teacher once over its training blocks and store the signal.

    `settings`: out=DIR (required), kind=topk|dense|sampled, k=64, samples=64, temperature=1.0, batch_size=8.
    A later `kdkit distill recipe=... teacher.model=null teacher.cache=DIR` trains from it.
    """
    from .models import load_causal_lm
    from .signal_store import SignalSpec, write_signal_store

    if not recipe.teacher.model:
        raise ConfigError("teacher-signal needs teacher.model (the teacher to run once)")
    if "out" not in settings:
        raise ConfigError("teacher-signal needs out=DIR (the store folder)")
    spec = SignalSpec(kind=settings.get("kind", "topk"), k=int(settings.get("k", 64)),
                      samples=int(settings.get("samples", 64)), temperature=float(settings.get("temperature", 1.0)),
                      seed=recipe.trainer.seed)
    teacher, tok = load_causal_lm(recipe.teacher.model, dtype=recipe.llm.dtype,
                                  device="cuda" if torch.cuda.is_available() and not recipe.trainer.cpu else "cpu")
    train, _ = build_lm_blocks(recipe, tok)
    return write_signal_store(teacher, train, settings["out"], spec, tok, batch_size=int(settings.get("batch_size", 8)),
                              progress=recipe.trainer.progress)


class TRLGKDRun:
    """`llm.on_policy.backend: trl`: the same recipe run by TRL's GKDTrainer (one token_kd loss of the jsd family)."""

    def __init__(self, recipe: Recipe, run_dir: Path, teacher, student, tokenizer):
        from accelerate import PartialState

        self.recipe, self.run_dir, self.teacher, self.student, self.tokenizer = recipe, run_dir, teacher, student, tokenizer
        self.accelerator = PartialState(cpu=use_cpu(recipe))
        built = build_losses(recipe, {"epochs": recipe.trainer.epochs})
        if len(built) != 1 or type(next(iter(built.values()))[1]).__name__ != "TokenKDLoss":
            raise ConfigError("llm.on_policy.backend=trl runs one token_kd loss (TRL's generalised JSD); use "
                              "backend=kdkit for other losses")
        self.loss = next(iter(built.values()))[1]
        if recipe.llm.max_steps is None:
            raise ConfigError("llm.on_policy.backend=trl needs llm.max_steps")

    def fit(self) -> dict:
        from .text_data import load_texts
        from .trl_gkd import train_with_trl_gkd

        r, lc = self.recipe, self.recipe.llm
        train = load_texts(r.data.name, "train", text_field=lc.text_field, limit=lc.train_examples)
        test = load_texts(r.data.name, "test", text_field=lc.text_field, limit=lc.eval_examples)
        metrics = train_with_trl_gkd(self.student, self.teacher, self.tokenizer, train, test, lc.on_policy,
                                     beta=self.loss.beta, T=self.loss.T, lr=r.optim.lr, max_steps=lc.max_steps,
                                     batch_size=r.data.batch_size, max_length=lc.block_size,
                                     output_dir=str(self.run_dir / "trl"), seed=r.trainer.seed,
                                     divergence=self.loss.divergence)
        if self.accelerator.is_main_process:
            self.student.save_pretrained(str(self.run_dir / "student"))
            self.tokenizer.save_pretrained(str(self.run_dir / "student"))
            (self.run_dir / "metrics.json").write_text(json.dumps({"summary": metrics}, indent=1, default=str))
        return metrics


def check_recipe(recipe: Recipe, mode: Mode) -> None:
    """Every rule of an LM recipe that needs no data or model (what `--dry-run` checks too)."""
    check_lm_mode(recipe, mode)


def run_recipe(recipe: Recipe, mode: Mode, recipe_name: str | None = None):
    """`kdkit train|distill` for an LM recipe: (run folder, summary); only the main process reports."""
    distiller = build_lm_distiller(recipe, mode, recipe_name)
    summary = distiller.fit()
    return (distiller.run_dir if distiller.accelerator.is_main_process else None), summary
