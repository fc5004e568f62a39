"""Recipe (task: lm) -> teacher, student, token blocks, losses -> LMDistiller: what `kdkit distill|train` run for LMs,
and what `kdkit teacher-signal` runs.

`check_recipe` applies every rule that needs no data and no model (the CLI calls it before any work, and
`--dry-run` runs the same), so a value the real run would refuse never passes it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch

from ..config import ConfigError, PositiveFloat, PositiveInt, Range, Recipe, apply_overrides, build
from ..losses import LOSSES
from ..method import build_method
from ..run import run_folder
from ..train.accelerated import check_resume, make_run, use_cpu
from ..train.build import Mode, build_losses, run_name
from .distiller import fused_options  # importing it registers the `lm` method
from .models import DTYPES, check_lm_name
from .students import check_student
from .text_data import is_named

STUDENT_FROM_TEACHER = ("truncated-teacher", "scratch")
# losses that read the teacher's full distribution from any signal that has one (a top-k store's, densified)
STORE_FULL_DISTRIBUTION = ("TAIDLoss", "AdaKDLoss")


def check_lm_mode(recipe: Recipe, mode: Mode) -> None:
    """`train`: CE only (teachers, no-teacher baselines); the teacher may be named only as the source a
    truncated student is cut from. `distill`: at least one loss, and a teacher (live or stored) for it; the
    losses' options, and what each backend and path (fused kernel, stored signal, cross-tokenizer, TRL) runs."""
    losses = {k: v for k, v in recipe.losses.items() if v is not None}
    lc = recipe.llm
    if recipe.peer:
        raise ConfigError("LM recipes take a teacher (teacher.model), several (teachers:) or a stored signal "
                          "(teacher.cache); peer: (online distillation) is a classifier option")
    if recipe.teachers:
        check_lm_teachers(recipe, mode)
        return
    if recipe.teacher.checkpoint or recipe.student.checkpoint:
        raise ConfigError("LM models are named by teacher.model / student.model (a model name, hf:<id> or a saved "
                          "folder); teacher.checkpoint / student.checkpoint are classifier options")
    if mode == "train":
        if losses:
            raise ConfigError(f"`kdkit train` runs no distillation loss, but the recipe has {sorted(losses)}: use "
                              "`kdkit distill`, or override losses={} for the no-teacher baseline")
        if recipe.teacher.cache:
            raise ConfigError("`kdkit train` uses no teacher signal; drop teacher.cache")
        if recipe.teacher.model and recipe.student.model not in STUDENT_FROM_TEACHER:
            raise ConfigError(f"`kdkit train` has no teacher; teacher.model={recipe.teacher.model} is only allowed "
                              "as the model a truncated-teacher/scratch student is built from")
        if not recipe.ce_weight:
            raise ConfigError("`kdkit train` trains on cross-entropy alone: ce_weight must be > 0")
        if lc.fused:
            raise ConfigError("llm.fused=true fuses token KD with CE; `kdkit train` has no KD loss: set "
                              "llm.fused=false")
        if lc.on_policy.fraction > 0:
            raise ConfigError("on-policy batches are scored by a teacher; `kdkit train` has none: set "
                              "llm.on_policy.fraction=0")
        return
    if not losses:
        raise ConfigError("`kdkit distill` needs at least one loss, e.g. losses.kd.type=token_kd; "
                          f"choices: {', '.join(LOSSES.names())}")
    if not (recipe.teacher.model or recipe.teacher.cache):
        raise ConfigError("LM distillation needs teacher.model (a model name or folder, e.g. smollm2-135m-instruct) "
                          "or teacher.cache (a teacher-signal store folder)")
    built = build_losses(recipe, {"epochs": recipe.trainer.epochs})  # option values checked before any work
    kinds = {n: type(loss).__name__ for n, (_, loss) in built.items()}
    live = bool(recipe.teacher.model) and not recipe.teacher.cache
    if recipe.teacher.cache:
        store_kind = _store_meta(recipe.teacher.cache).get("kind")
        full = STORE_FULL_DISTRIBUTION if store_kind in ("topk", "dense") else ()
        other = sorted(n for n, k in kinds.items() if k != "TokenKDLoss" and k not in full)
        if other:
            raise ConfigError(f"a stored teacher signal (teacher.cache) trains token_kd losses (and taid/adakd from a "
                              f"top-k or dense store); {other} need the live teacher's logits (set teacher.model)")
        _check_store_losses(recipe.teacher.cache, built)
    if recipe.teacher.server:
        check_served_teacher(recipe, kinds, built)
    cross = sorted(n for n, k in kinds.items() if k == "CrossTokenizerLoss")
    if cross:
        other = sorted(set(built) - set(cross))
        if other:
            raise ConfigError(f"{cross} (cross_tokenizer) compares text chunks across vocabularies and runs with no "
                              f"token-level loss; {other} compare next-token distributions position by position")
        if not live:
            raise ConfigError("cross_tokenizer needs a live teacher (teacher.model): a stored signal holds one "
                              "tokenizer's positions")
        if lc.on_policy.fraction > 0 or lc.fused:
            raise ConfigError("cross_tokenizer runs without llm.fused and llm.on_policy (set them to false / 0)")
    if recipe.teacher.cache and lc.on_policy.fraction > 0:
        raise ConfigError("on-policy distillation (llm.on_policy.fraction > 0) needs a live teacher to score the "
                          "student's own text; a stored signal only covers the stored blocks")
    if lc.on_policy.backend == "trl":
        check_trl(recipe, built, live)
    elif lc.fused:
        fused_options(built)
        if not live and _store_meta(recipe.teacher.cache).get("kind") != "topk":
            raise ConfigError("llm.fused=true needs a live teacher (teacher.model) or a top-k teacher-signal store "
                              "(teacher.cache); dense and sampled stores use the unfused path (llm.fused=false)")


def check_lm_teachers(recipe: Recipe, mode: Mode) -> None:
    """`teachers:` in an LM recipe: two or more, local (`model`) or served (`server` + `model`), routed or mixed
    (`llm.multi_teacher`) into token_kd losses by kdkit's own loop, and one cross_tokenizer loss for the teachers
    with another tokenizer (which `check_cross_teachers` finds from the tokenizers)."""
    lc, mt, t = recipe.llm, recipe.llm.multi_teacher, recipe.teacher
    if mode != "distill":
        raise ConfigError("`kdkit train` has no teacher; teachers: is for `kdkit distill`")
    if t.model or t.cache or t.server:
        raise ConfigError("set either teacher (one) or teachers (a list), not both")
    if len(recipe.teachers) < 2:
        raise ConfigError(f"teachers: lists {len(recipe.teachers)} teacher; one goes in teacher.model")
    for i, tc in enumerate(recipe.teachers):
        if tc.cache or tc.checkpoint or not tc.model:
            raise ConfigError(f"teachers.{i} needs model (a name or folder; with server=URL for a served teacher) and "
                              "no cache/checkpoint: stored signals and classifier checkpoints take one teacher")
        check_lm_name(tc.model, f"teachers.{i}.model")
    losses = {k: v for k, v in recipe.losses.items() if v is not None}
    if not losses:
        raise ConfigError("`kdkit distill` needs at least one loss, e.g. losses.kd.type=token_kd")
    built = build_losses(recipe, {"epochs": recipe.trainer.epochs})
    kinds = {n: type(loss).__name__ for n, (_, loss) in built.items()}
    other = sorted(n for n, k in kinds.items() if k not in ("TokenKDLoss", "CrossTokenizerLoss"))
    if other:
        raise ConfigError(f"several LM teachers (teachers:) train token_kd losses (and one cross_tokenizer loss for "
                          f"teachers with another tokenizer); {other} take one teacher")
    cross = sorted(n for n, k in kinds.items() if k == "CrossTokenizerLoss")
    if len(cross) > 1:
        raise ConfigError(f"one cross_tokenizer loss serves every teacher with another tokenizer; the recipe has "
                          f"{cross}: keep one")
    served = [i for i, tc in enumerate(recipe.teachers) if tc.server]
    for name, (_, loss) in built.items():
        if served and kinds[name] == "TokenKDLoss" and float(loss.T) != 1.0:
            raise ConfigError(f"losses.{name}.T={loss.T}: teachers.{served[0]} is served, and a served teacher's "
                              f"top-k log-probs are at temperature 1; set losses.{name}.T=1")
    if lc.fused or lc.on_policy.fraction > 0 or lc.on_policy.backend == "trl":
        raise ConfigError("several LM teachers run on kdkit's unfused loop: set llm.fused=false and "
                          "llm.on_policy.fraction=0 (backend=kdkit)")
    k = len(recipe.teachers)
    if mt.mix == "fixed" and len(mt.weights) != k:
        raise ConfigError(f"llm.multi_teacher.weights={mt.weights} needs one weight per teacher ({k})")
    if mt.route_values and len(mt.route_values) != k:
        raise ConfigError(f"llm.multi_teacher.route_values={mt.route_values} needs one value per teacher ({k})")
    name = recipe.data.name
    joined = "+" in name and is_named(name)
    if mt.mix == "route" and (name == "gsm8k" or name.startswith("jsonl:") or is_named(name) and not joined
                              or joined and mt.route_by != "source"):
        raise ConfigError(f"llm.multi_teacher.route_by={mt.route_by}: data.name={name} has no such column; routing "
                          "needs a local .jsonl/.parquet/.csv file or an hf: dataset with one, or sets joined by '+' "
                          "(route_by=source)")
    s = recipe.student
    if s.model == "truncated-teacher" and recipe.teachers[0].server:
        raise ConfigError("student.model=truncated-teacher is cut from teachers.0, which is served (its weights "
                          "stay on the server); name a student model, or make teachers.0 a local one")
    if s.model == "scratch" and "tokenizer" not in (s.options or {}):
        raise ConfigError("student.model=scratch with several teachers takes student.options={tokenizer: ..., "
                          "config: {...}}")


def check_served_teacher(recipe: Recipe, kinds: dict, built: dict) -> None:
    """A served teacher returns top-k log-probs at temperature 1: token_kd losses at T = 1, kdkit's own loop."""
    if recipe.teacher.cache:
        raise ConfigError("teacher.server and teacher.cache are two sources of the teacher signal; set one")
    other = sorted(n for n, k in kinds.items() if k != "TokenKDLoss")
    if other:
        raise ConfigError(f"a served teacher (teacher.server) returns top-k log-probs, which train token_kd losses "
                          f"only; {other} need the teacher's logits or hidden states (drop teacher.server)")
    for name, (_, loss) in built.items():
        if float(loss.T) != 1.0:
            raise ConfigError(f"losses.{name}.T={loss.T}: a served teacher's log-probs are at temperature 1 and a "
                              f"top-k signal cannot be re-tempered; set losses.{name}.T=1")
    if recipe.llm.on_policy.backend == "trl":
        raise ConfigError("llm.on_policy.backend=trl runs TRL's trainer with the teacher's weights; a served teacher "
                          "(teacher.server) trains with kdkit's loop (llm.on_policy.backend=kdkit)")
    s = recipe.student
    if s.model in STUDENT_FROM_TEACHER and "tokenizer" not in (s.options or {}):
        raise ConfigError(f"student.model={s.model} is built from the teacher's weights, which stay on the server "
                          "(teacher.server); name a student model, or a scratch one with student.options.tokenizer "
                          "and student.options.config")


def check_trl(recipe: Recipe, built: dict, live: bool) -> None:
    """`llm.on_policy.backend=trl`: what TRL's DistillationTrainer runs (one token_kd loss of the generalised-JSD
    family at T=1, a live teacher, a step budget; vLLM generation only on CUDA with vllm installed) and what it does
    not (kdkit checkpoints: no resume)."""
    from .trl_distill import check_loss_temperature, check_vllm, trl_beta

    if len(built) != 1 or type(next(iter(built.values()))[1]).__name__ != "TokenKDLoss":
        raise ConfigError("llm.on_policy.backend=trl runs one token_kd loss (TRL's generalised JSD); use "
                          "backend=kdkit for other losses")
    (name, (_, loss)), = built.items()
    trl_beta(loss.divergence, loss.beta)
    check_loss_temperature(loss.T, f"losses.{name}.T")
    if not live:
        raise ConfigError("llm.on_policy.backend=trl needs a live teacher (teacher.model), not teacher.cache")
    if recipe.llm.max_steps is None:
        raise ConfigError("llm.on_policy.backend=trl needs llm.max_steps (TRL's step budget)")
    if recipe.resume:
        raise ConfigError("llm.on_policy.backend=trl runs TRL's own loop, which kdkit cannot resume: drop resume "
                          "(or use llm.on_policy.backend=kdkit)")
    if recipe.llm.on_policy.vllm:
        check_vllm(cpu=use_cpu(recipe))


def check_precision(recipe: Recipe) -> None:
    """Weights dtype against mixed precision and the device: fp16 loss scaling cannot unscale fp16 gradients,
    and bf16 needs a device that has it."""
    t, dtype = recipe.trainer, recipe.llm.dtype
    if t.mixed_precision == "fp16" and dtype == "float16":
        raise ConfigError("trainer.mixed_precision=fp16 scales the loss and unscales float32 gradients; with "
                          "llm.dtype=float16 weights the gradients are float16 too (torch refuses to unscale them): "
                          "set llm.dtype=float32 or trainer.mixed_precision=no")
    bf16 = t.mixed_precision == "bf16" or dtype == "bfloat16"
    if bf16 and not use_cpu(recipe) and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"this GPU has no bfloat16 (trainer.mixed_precision={t.mixed_precision}, "
                          f"llm.dtype={dtype}): use float16/fp16 or float32")


def check_data(recipe: Recipe) -> None:
    """`data.name`: gsm8k, hf:<dataset>[:<config>], or local files with a train and a test split."""
    from .text_data import local_file

    name = recipe.data.name
    if name != "gsm8k" and not name.startswith("hf:") and not is_named(name):
        for split in ("train", "test"):
            local_file(name, split)


def check_signal_store(recipe: Recipe) -> None:
    """`teacher.cache`: a readable teacher-signal store made with this recipe's block size."""
    from .signal_store import open_signal_store

    store = open_signal_store(recipe.teacher.cache)
    if store.block_size != recipe.llm.block_size:
        raise ConfigError(f"teacher.cache={recipe.teacher.cache} holds blocks of {store.block_size} tokens but "
                          f"llm.block_size={recipe.llm.block_size}: build the store with the same block size")


def check_recipe(recipe: Recipe, mode: Mode) -> None:
    """Every rule of an LM recipe that needs no data or model (what `--dry-run` checks too): the mode and its
    losses, model names and student options, precision, data files, a stored signal, and the resume rule."""
    check_lm_mode(recipe, mode)
    if recipe.teacher.model:
        check_lm_name(recipe.teacher.model, "teacher.model")
    check_student(recipe.student, bool(recipe.teacher.model or recipe.teachers), recipe.llm)
    check_precision(recipe)
    check_data(recipe)
    if mode == "distill" and len(recipe.teachers) > 1:
        if recipe.llm.multi_teacher.mix == "route":
            text_routes(recipe)  # the route column's values, before any teacher loads
        from .cross_teachers import check_cross_teachers

        check_cross_teachers(recipe, *recipe_tokenizers(recipe))  # teachers with another tokenizer (tokenizers only)
    if mode == "distill" and recipe.teacher.cache:
        check_signal_store(recipe)
    check_resume(recipe, run_folder(recipe.output_dir, recipe.name, "run"))


def recipe_tokenizers(recipe: Recipe) -> tuple[list, object]:
    """(each teacher's tokenizer, the student's) without loading a model (an alias not converted yet is read from
    its GGUF file): a student cut from, or built on, teachers.0 has its tokenizer."""
    from .models import load_tokenizer

    teachers = [load_tokenizer(tc.model, convert=False) for tc in recipe.teachers]
    s = recipe.student
    if s.model == "scratch" and "tokenizer" in (s.options or {}):
        return teachers, scratch_tokenizer(s.options)
    if s.model in STUDENT_FROM_TEACHER:
        return teachers, teachers[0]
    return teachers, load_tokenizer(s.model, convert=False)


def scratch_tokenizer(options: dict):
    """The tokenizer of a scratch student with its own: `options.tokenizer`, a tokenizer folder or any model name
    resolve_lm knows."""
    from transformers import AutoTokenizer

    from .models import resolve_lm

    where = Path(options["tokenizer"])
    return AutoTokenizer.from_pretrained(str(where if where.is_dir() else resolve_lm(options["tokenizer"])))


def _scratch_without_teacher(options: dict, dtype):
    """A randomly initialised LM from `options`: {tokenizer: NAME-or-folder, config: {model_type: llama, ...}}."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = scratch_tokenizer(options)
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
    tokenizer unless a cross_tokenizer loss says not. With `teachers:`, the teachers and their tokenizers as lists."""
    from .models import load_causal_lm, load_tokenizer
    from .students import build_student
    from .tokenizers import require_same_tokenizer

    dtype = DTYPES[recipe.llm.dtype]
    teacher, t_tok = None, None
    if recipe.teachers:
        teacher, t_toks = build_lm_teachers(recipe)
        source = teacher[0]  # a truncated student is cut from teachers.0
        s = recipe.student
        if s.model == "scratch" and "tokenizer" in (s.options or {}):
            student, tok = _scratch_without_teacher(s.options, dtype)
        else:
            tok = t_toks[0] if s.model in STUDENT_FROM_TEACHER else load_tokenizer(s.model)
            student = build_student(s, source, recipe.llm, dtype)
        if cross_tokenizer_loss(recipe) is None:  # else a teacher with another tokenizer trains through it
            for i, t in enumerate(t_toks):
                _one_tokenizer(t, tok, f"teachers.{i} and the student")
        return teacher, student, tok, t_toks
    if recipe.teacher.server and mode == "distill":
        from .teacher_server import served_teacher

        teacher = served_teacher(recipe.teacher)
        t_tok = teacher.tokenizer
    elif recipe.teacher.model:
        teacher, t_tok = load_causal_lm(recipe.teacher.model, dtype=recipe.llm.dtype)
        teacher.requires_grad_(False)
    s = recipe.student
    if s.model == "scratch" and (teacher is None or "tokenizer" in (s.options or {})):
        student, tok = _scratch_without_teacher(s.options, dtype)  # e.g. for cross-tokenizer KD
    elif s.model in STUDENT_FROM_TEACHER:
        student, tok = build_student(s, teacher, recipe.llm, dtype), t_tok
    else:
        tok = load_tokenizer(s.model)
        student = build_student(s, teacher, recipe.llm, dtype)
    if mode == "train" and teacher is not None:
        teacher = None  # only the source of the student's initial weights
    if t_tok is not None and mode == "distill" and cross_tokenizer_loss(recipe) is None:
        require_same_tokenizer(t_tok, tok)
    return teacher, student, tok, t_tok


def build_lm_teachers(recipe: Recipe) -> tuple[list, list]:
    """The recipe's `teachers:` (local models, frozen, or checked server clients) and their tokenizers (compared with
    the student's by `build_lm_models`)."""
    from .models import load_causal_lm
    from .teacher_server import served_teacher

    teachers, toks = [], []
    for tc in recipe.teachers:
        if tc.server:
            teacher = served_teacher(tc)
            tok = teacher.tokenizer
        else:
            teacher, tok = load_causal_lm(tc.model, dtype=recipe.llm.dtype)
            teacher.requires_grad_(False)
        teachers.append(teacher)
        toks.append(tok)
    return teachers, toks


def _one_tokenizer(a, b, who: str) -> None:
    """Token KD teachers share the student's vocabulary, position by position."""
    from ..errors import TokenizerMismatchError
    from .tokenizers import tokenizer_differences

    reasons = tokenizer_differences(a, b)
    if reasons:
        raise TokenizerMismatchError(
            f"several teachers (teachers:) are mixed or routed id by id by token KD, so they and the student share "
            f"one tokenizer, but {who} differ: " + "; ".join(reasons) + ". A teacher with another tokenizer trains "
            "through a cross_tokenizer loss (add e.g. losses.ct={type: cross_tokenizer, weight: 30})")


def text_routes(recipe: Recipe) -> dict[str, list[int]]:
    """`llm.multi_teacher.mix=route`: each train and test text's teacher, read from the `route_by` column; refused
    in one line when a value names no teacher or a teacher gets no text (checked before any model loads)."""
    from .multi_teacher import route_index
    from .text_data import load_column

    lc, mt = recipe.llm, recipe.llm.multi_teacher
    k, out = len(recipe.teachers), {}
    for split, limit in (("train", lc.train_examples), ("test", lc.eval_examples)):
        routes = route_index(load_column(recipe.data.name, split, mt.route_by, limit), mt.route_values, k,
                             mt.route_by)
        for i in sorted(set(range(k)) - set(routes)):
            name = mt.route_values[i] if mt.route_values else i
            where = f" among the first {limit}" if limit else ""
            raise ConfigError(f"no {split} text{where} has {mt.route_by}={name} (teachers.{i}); every teacher "
                              f"needs {split} text of its own")
        out[split] = routes
    return out


def build_routed_blocks(recipe: Recipe, tokenizer, skip=()) -> dict:
    """`llm.multi_teacher.mix=route`: each route's texts packed into their own blocks (a block never straddles two
    teachers). {"train", "test": blocks [n, L]; "train_routes", "test_routes": each block's teacher [n]}. The
    training texts of the teachers in `skip` (another tokenizer: they read whole texts) make no blocks."""
    from .text_data import pack_blocks

    lc = recipe.llm
    k, out = len(recipe.teachers), {}
    routes_by_split = text_routes(recipe)
    for split, texts in zip(("train", "test"), lm_texts(recipe)):
        routes = routes_by_split[split]
        blocks, owner = [], []
        for i in range(k):
            mine = [t for t, r in zip(texts, routes) if r == i]
            packed = (torch.empty(0, lc.block_size, dtype=torch.long) if split == "train" and i in skip
                      else pack_blocks(mine, tokenizer, lc.block_size))
            blocks.append(packed)
            owner.append(torch.full((len(packed),), i, dtype=torch.long))
        out[split], out[f"{split}_routes"] = torch.cat(blocks), torch.cat(owner)
    return out


def lm_texts(recipe: Recipe) -> tuple[list[str], list[str]]:
    """The recipe's training and evaluation texts (the first llm.train_examples / llm.eval_examples)."""
    from .text_data import load_texts

    lc = recipe.llm
    return (load_texts(recipe.data.name, "train", text_field=lc.text_field, limit=lc.train_examples),
            load_texts(recipe.data.name, "test", text_field=lc.text_field, limit=lc.eval_examples))


def build_lm_blocks(recipe: Recipe, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and evaluation token blocks [n, block_size] from the recipe's text dataset."""
    from .text_data import pack_blocks

    train, test = lm_texts(recipe)
    return pack_blocks(train, tokenizer, recipe.llm.block_size), pack_blocks(test, tokenizer, recipe.llm.block_size)


def build_lm_distiller(recipe: Recipe, mode: Mode, recipe_name: str | None = None, on_step=None):
    """Everything an LM run needs, checked then built: teacher, student, token blocks (or a stored signal, or
    aligned texts), losses, run folder; the TRL backend's run when `llm.on_policy.backend=trl`."""
    from accelerate import PartialState

    from ..run import seed_everything

    check_recipe(recipe, mode)
    state = PartialState(cpu=use_cpu(recipe))
    run_dir = Path(recipe.output_dir) / run_name(recipe, recipe_name)
    seed_everything(recipe.trainer.seed)
    routes = cross_teachers = None
    with state.main_process_first():
        teacher, student, tok, t_tok = build_lm_models(recipe, mode)
        alm = []
        if recipe.teachers and mode == "distill":
            from .cross_teachers import other_tokenizer

            alm = other_tokenizer(t_tok, tok)  # teachers with another tokenizer: the ALM path
        if recipe.teachers and recipe.llm.multi_teacher.mix == "route":
            routes = build_routed_blocks(recipe, tok, skip=alm)
            train, test = routes.pop("train"), routes.pop("test")
        else:
            train, test = build_lm_blocks(recipe, tok)
    if mode == "distill" and recipe.llm.on_policy.backend == "trl":
        return TRLGKDRun(recipe, run_dir, teacher, student, tok)
    store = None
    if mode == "distill" and recipe.teacher.cache:
        from .signal_store import open_signal_store

        store = open_signal_store(recipe.teacher.cache, tokenizer=tok, streaming=False)
        train = store.blocks()
    losses = build_losses(recipe, {"epochs": recipe.trainer.epochs}) if mode == "distill" else {}
    cross = None
    if alm:
        from .cross_teachers import build_cross_teachers

        routed = recipe.llm.multi_teacher.mix == "route"
        cross_teachers = build_cross_teachers(recipe, t_tok, tok, alm, losses[cross_tokenizer_loss(recipe)][1],
                                              lm_texts(recipe), text_routes(recipe) if routed else None)
        if cross_teachers.owner is None:
            train = None  # mixed: every teacher reads the same whole texts
    elif mode == "distill" and cross_tokenizer_loss(recipe) is not None and not recipe.teachers:
        cross = _cross_tokenizer_data(recipe, t_tok, tok, losses[cross_tokenizer_loss(recipe)][1])
        train = None
    meta = {"teacher": recipe.teacher.model or recipe.teacher.cache or [t.server or t.model for t in recipe.teachers],
            "student": recipe.student.model,
            **({"teacher_server": recipe.teacher.server} if recipe.teacher.server else {}),
            "student_options": json.dumps(recipe.student.options), "data": recipe.data.name,
            "block_size": recipe.llm.block_size}
    ctx = dict(recipe=recipe, run_dir=run_dir, student=student, tokenizer=tok, train_blocks=train, eval_blocks=test,
               teacher=teacher, losses=losses, store=store, on_step=on_step, meta=meta, cross=cross, routes=routes,
               cross_teachers=cross_teachers)
    return build_method("distill", "lm", ctx, {})


def _cross_tokenizer_data(recipe: Recipe, teacher_tok, student_tok, loss) -> dict:
    """Whole training texts (each cut to llm.block_size tokens on either side), their chunk aligner, and the
    evaluation text in the teacher's tokens (its perplexity is reported over its own tokens)."""
    from .cross_tokenizer import CrossTokenizerBatcher
    from .text_data import pack_blocks

    lc = recipe.llm
    texts, test = lm_texts(recipe)
    return {"texts": texts, "batcher": CrossTokenizerBatcher(teacher_tok, student_tok, lc.block_size,
                                                             chunks=loss.chunks),
            "teacher_eval_blocks": pack_blocks(test, teacher_tok, lc.block_size)}


@dataclass
class TeacherSignalOptions:
    """`kdkit teacher-signal recipe=NAME out=DIR [...]`: what to keep of the teacher's next-token distribution."""

    out: str | None = None  # the store folder (required)
    kind: Literal["topk", "dense", "sampled"] = "topk"
    k: PositiveInt = 64  # topk: ids kept per position
    samples: Annotated[int, Range(ge=1, le=32767)] = 64  # sampled: draws per position (counts are int16)
    temperature: PositiveFloat = 1.0  # the signal is softmax(logits / temperature)
    batch_size: PositiveInt = 8  # blocks per teacher forward
    # blocks per shard file (null: about 256 MiB each); a write stopped mid-shard loses that shard, so smaller
    # shards lose less of a long write on a CPU
    shard_rows: PositiveInt | None = None
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"  # storage of the log-probabilities (plain codec)
    codec: Literal["plain", "compact"] = "plain"  # topk: compact = sorted-id gaps + b-bit codes + tail mass
    bits: Annotated[int, Range(ge=2, le=8)] = 4  # compact: bits per log-prob code

    def validate(self, at: str) -> None:
        if not self.out:
            raise ConfigError(f"teacher-signal needs {at}out=DIR (the store folder)")
        if self.codec == "compact" and self.kind != "topk":
            raise ConfigError(f"{at}codec=compact stores top-k signals only; set kind=topk (got kind={self.kind})")


def _store_meta(path) -> dict:
    """A store's signal_store.json ({} when unreadable: opening the store then names what is wrong)."""
    try:
        return json.loads((Path(path) / "signal_store.json").read_text())
    except (OSError, ValueError):
        return {}


def _check_store_losses(path, built: dict) -> None:
    """Before any work: a sparse store serves only its own temperature, and a sampled one forward KL only."""
    meta = _store_meta(path)
    kind, spec = meta.get("kind"), meta.get("spec") or {}
    if kind not in ("topk", "sampled"):
        return
    T0 = float(spec.get("temperature", 1.0))
    for name, (_, loss) in built.items():
        if float(loss.T) != T0:
            raise ConfigError(f"losses.{name}.T={loss.T}: the {kind} store {path} was made at temperature {T0}, and "
                              f"a sparse signal cannot be re-tempered; set losses.{name}.T={T0} or rebuild the store")
        if kind == "sampled" and getattr(loss, "divergence", None) != "fkl":
            raise ConfigError(f"losses.{name}.divergence={loss.divergence}: a sampled (RS-KD) store estimates forward "
                              "KL only; set divergence=fkl, or use a dense or top-k store")


def teacher_signal_options(settings: list[str]) -> tuple[TeacherSignalOptions, list[str]]:
    """(the verb's own options, typed and range-checked; the recipe overrides among `settings`)."""
    from dataclasses import fields

    names = {f.name for f in fields(TeacherSignalOptions)}
    own = [s for s in settings if s.partition("=")[0] in names]
    return build(TeacherSignalOptions, apply_overrides({}, own), ""), [s for s in settings if s not in own]


def check_teacher_signal(recipe: Recipe, options: TeacherSignalOptions) -> None:
    """Every rule of `kdkit teacher-signal` that needs no model: an LM recipe with a live teacher, its data."""
    if recipe.task != "lm":
        raise ConfigError(f"teacher-signal runs an LM recipe's teacher (task: lm); this recipe is task: {recipe.task}")
    if not recipe.teacher.model:
        raise ConfigError("teacher-signal needs teacher.model (the teacher to run once)")
    check_lm_name(recipe.teacher.model, "teacher.model")
    if recipe.teacher.server:
        if options.kind != "topk" or options.temperature != 1.0:
            raise ConfigError(f"kind={options.kind} temperature={options.temperature}: a served teacher "
                              "(teacher.server) returns top-k log-probs at temperature 1; use kind=topk temperature=1")
        if options.k > recipe.teacher.server_k:
            raise ConfigError(f"k={options.k} is more than the served teacher's teacher.server_k="
                              f"{recipe.teacher.server_k}; raise teacher.server_k (and the server's --max-logprobs)")
    check_precision(recipe)
    check_data(recipe)
    out = Path(options.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={options.out} is a file; the store is a folder")


def write_store_from_recipe(recipe: Recipe, options: TeacherSignalOptions) -> Path:
    """`kdkit teacher-signal`: run the recipe's teacher once over its training blocks and store the signal. A later
    `kdkit distill recipe=... teacher.cache=DIR` trains from it."""
    from .models import load_causal_lm
    from .signal_store import SignalSpec, write_signal_store

    check_teacher_signal(recipe, options)
    spec = SignalSpec(kind=options.kind, k=options.k, samples=options.samples, temperature=options.temperature,
                      dtype=options.dtype, seed=recipe.trainer.seed, codec=options.codec, bits=options.bits)
    if recipe.teacher.server:
        from .teacher_server import served_teacher

        teacher = served_teacher(recipe.teacher)
        tok = teacher.tokenizer
    else:
        teacher, tok = load_causal_lm(recipe.teacher.model, dtype=recipe.llm.dtype,
                                      device="cpu" if use_cpu(recipe) else "cuda")
    train, _ = build_lm_blocks(recipe, tok)
    return write_signal_store(teacher, train, options.out, spec, tok, batch_size=options.batch_size,
                              progress=recipe.trainer.progress, shard_rows=options.shard_rows)


class TRLGKDRun:
    """`llm.on_policy.backend: trl`: the same recipe run by TRL's DistillationTrainer (one token_kd loss of the jsd
    family, GKD's lambda = llm.on_policy.fraction),
    in a kdkit run folder (config.yaml, train.log, metrics.json, the student; TRL's own files under trl/)."""

    def __init__(self, recipe: Recipe, run_dir: Path, teacher, student, tokenizer):
        from accelerate import PartialState

        self.recipe, self.run_dir, self.teacher, self.student = recipe, run_dir, teacher, student
        self.tokenizer = tokenizer
        self.accelerator = PartialState(cpu=use_cpu(recipe))
        self.run = make_run(recipe, run_dir, main=self.accelerator.is_main_process,
                            barrier=self.accelerator.wait_for_everyone)
        (_, self.loss), = build_losses(recipe, {"epochs": recipe.trainer.epochs}).values()

    def fit(self) -> dict:
        from .text_data import load_texts
        from .trl_distill import train_with_trl

        r, lc = self.recipe, self.recipe.llm
        self.run.start()
        train = load_texts(r.data.name, "train", text_field=lc.text_field, limit=lc.train_examples)
        test = load_texts(r.data.name, "test", text_field=lc.text_field, limit=lc.eval_examples)
        metrics = train_with_trl(self.student, self.teacher, self.tokenizer, train, test, lc.on_policy,
                                 beta=self.loss.beta, T=self.loss.T, lr=r.optim.lr, max_steps=lc.max_steps,
                                 batch_size=r.data.batch_size, max_length=lc.block_size,
                                 output_dir=str(self.run_dir / "trl"), seed=r.trainer.seed,
                                 divergence=self.loss.divergence)
        if self.accelerator.is_main_process:
            from ..checkpoint import atomic_path

            with atomic_path(self.run_dir / "student") as tmp:
                self.student.save_pretrained(str(tmp))
                self.tokenizer.save_pretrained(str(tmp))
        self.run.write_json("metrics.json", {"summary": metrics})
        self.run.log("TRL GKD: " + "  ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
        self.run.close()
        return metrics


def run_recipe(recipe: Recipe, mode: Mode, recipe_name: str | None = None):
    """`kdkit train|distill` for an LM recipe: (run folder, summary); only the main process reports."""
    distiller = build_lm_distiller(recipe, mode, recipe_name)
    summary = distiller.fit()
    return (distiller.run_dir if distiller.accelerator.is_main_process else None), summary
