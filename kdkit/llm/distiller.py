"""The LM Distiller: causal-LM student trained on token blocks with CE and token KD losses, as one `Method`.

Same shape as the classifier Distiller, on the same accelerate base (`kdkit.train.accelerated`) and the same loop
(`kdkit.method.fit`): the student and every parameter a loss owns live in one module (`LMStep`, the only thing
handed to DDP); the teacher is frozen and runs under inference mode, or is replaced by a teacher-signal store read
from disk. Perplexity is evaluated every `llm.eval_every_steps` steps (default: each epoch's end) and after the
last, with a checkpoint each time and every `trainer.save_every_steps` steps.

Position t of the logits predicts token t+1: the step shifts once, so every loss sees aligned `[B, L-1, V]`
logits and `[B, L-1]` labels (-100 where a token does not count).

Cross-tokenizer distillation (a `cross_tokenizer` loss, teacher and student tokenizing differently) trains on texts
instead of shared token blocks: each step's texts are tokenized by both tokenizers and aligned into chunks
(`CrossTokenizerBatcher`), and the losses see both models' unshifted logits with their own ids and chunk ids.
Among several teachers (`teachers:`), a teacher with another tokenizer takes that path too, beside the token-KD
teachers (`kdkit.llm.cross_teachers`: routed steps take one path each, mixed steps sum both).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import checkpoint as ckpt
from ..config import Recipe
from ..errors import ConfigError
from ..method import register_method
from ..models.outputs import Outputs
from ..signals import CrossTokenizerChunks, DenseLogits, HiddenStates, TeacherSignal, TopK
from ..train.accelerated import AcceleratedMethod
from ..losses.cross_tokenizer import CrossTokenizerLoss
from .cross_teachers import CrossTeachers, RoutedPaths, TeacherPaths
from .teacher_server import ServedTeacher


def shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at positions 0..L-2 against labels 1..L-1 (next-token prediction)."""
    return logits[:, :-1], labels[:, 1:]


class LMStep(nn.Module):
    """Student + loss parameters; forward returns the weighted loss terms of one batch."""

    def __init__(self, student: nn.Module, losses: dict, ce_weight: float, *, fused: dict | None = None,
                 mix: nn.Module | None = None):
        super().__init__()
        self.student = student
        self.mix = mix  # several teachers' signals -> their mixture at each loss's T (`TeacherMix`)
        self.losses = nn.ModuleDict({name: loss for name, (_, loss) in losses.items()})
        self.weights = {name: float(w) for name, (w, _) in losses.items()}
        self.ce_weight = float(ce_weight)
        self.fused = fused  # {loss name: kernel options} when token KD runs through the fused linear-KD kernel

    def forward(self, input_ids, attention_mask, labels, teacher: TeacherSignal | None, use_ce: bool = True,
                student_features: dict | None = None):
        """`use_ce=False` on student-generated (on-policy) batches: no hard-label CE on the student's own text.
        `teacher`: the step's `TeacherSignal` at the shifted positions [B, L-1] (dense logits from a live teacher,
        hidden states + head for the fused kernel, a stored signal of any kind), or `CrossTokenizerChunks` over
        the teacher's own tokens with `student_features` the student's side; a list of signals, one per teacher,
        that `mix` mixes; `TeacherPaths` (teachers across tokenizers: the token signal times its share, plus one
        cross-tokenizer term per ALM teacher times its share, named LOSS_teacherJ); None without a teacher. Every
        loss gets the signal itself and applies its own settings; cross_tokenizer losses read chunks, the others
        token signals."""
        terms = {}
        if self.fused is not None:
            return self._fused_terms(input_ids, attention_mask, labels, teacher, use_ce)
        logits = self.student(input_ids=input_ids, attention_mask=attention_mask).logits
        s_logits, y = shift(logits, labels)
        if self.ce_weight and use_ce:
            terms["ce"] = self.ce_weight * F.cross_entropy(s_logits.flatten(0, 1).float(), y.flatten(),
                                                           ignore_index=-100)
        if isinstance(teacher, CrossTokenizerChunks):
            teacher = TeacherPaths(cross=[(None, 1.0, teacher, student_features)])
        share = 1.0
        if isinstance(teacher, TeacherPaths):
            for key, w, chunks, features in teacher.cross:
                s_out = Outputs(logits, features or {})
                for name, loss in self.losses.items():
                    if isinstance(loss, CrossTokenizerLoss):
                        terms[name if key is None else f"{name}_{key}"] = w * self.weights[name] * loss(s_out, chunks)
            if teacher.token is None or not teacher.token_share:
                return terms
            share, teacher = teacher.token_share, teacher.token
        mixed = {}
        for name, loss in self.losses.items():
            if isinstance(loss, CrossTokenizerLoss):
                continue
            signal = teacher
            if isinstance(teacher, list):  # one mixture per temperature (exact at each loss's T)
                if loss.T not in mixed:
                    mixed[loss.T] = self.mix(teacher, loss.T, s_logits.shape[-1], name)
                signal = mixed[loss.T]
            terms[name] = share * self.weights[name] * loss(Outputs(s_logits), signal, y)
        return terms

    def _fused_terms(self, input_ids, attention_mask, labels, teacher: HiddenStates | TopK, use_ce: bool = True):
        from ..kernels import fused_linear_kd
        from .models import decoder_of, lm_head_of

        hidden = decoder_of(self.student)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        w_s, b_s = lm_head_of(self.student)
        (name, opts), = self.fused.items()
        _, y = shift(hidden, labels)
        flat = teacher.to(hidden.device)
        flat = (replace(flat, hidden=flat.hidden.flatten(0, 1)) if isinstance(flat, HiddenStates)
                else replace(flat, indices=flat.indices.flatten(0, 1), logprobs=flat.logprobs.flatten(0, 1)))
        loss = fused_linear_kd(hidden[:, :-1].flatten(0, 1), w_s, labels=y.flatten(), student_bias=b_s,
                               teacher=flat, kd_weight=self.weights[name],
                               ce_weight=self.ce_weight if use_ce else 0.0, **opts)
        return {f"ce+{name}": loss}


def fused_options(losses: dict) -> dict:
    """{loss name: kernel options} for `llm.fused=true`, which runs exactly one token_kd loss through the fused
    linear-KD kernel (checked by `kdkit distill` before any work, and by the LMDistiller for the Python API)."""
    from ..losses.token import TokenKDLoss

    if len(losses) != 1 or not isinstance(next(iter(losses.values()))[1], TokenKDLoss):
        kinds = {n: type(l).__name__ for n, (_, l) in losses.items()}
        raise ConfigError(f"llm.fused=true runs exactly one token_kd loss through the fused kernel; the recipe "
                          f"has {kinds or 'none'} (set llm.fused=false for other losses)")
    (name, (_, loss)), = losses.items()
    return {name: {"div": loss.div, "ignore_index": loss.ignore_index}}


def _teacher_mix(cfg, k: int, routes: dict | None, cross, store, lcfg, token_weights: list[float] | None = None):
    """The step's `TeacherMix` for mean/fixed/learned; None for routing (which needs each block's teacher). With
    teachers across tokenizers, `token_weights` are the shares of the same-tokenizer teachers the step mixes (None
    for fewer than two: one signal needs no mixture)."""
    from .multi_teacher import TeacherMix

    if cross is not None or store is not None or lcfg.fused or lcfg.on_policy.fraction > 0:
        raise ConfigError("several LM teachers run on kdkit's unfused loop, without teacher.cache, cross-tokenizer "
                          "losses, llm.fused or on-policy batches")
    if cfg.mix == "route":
        if routes is None or "train_routes" not in routes or "test_routes" not in routes:
            raise ConfigError("llm.multi_teacher.mix=route needs each block's teacher: pass routes={'train_routes': "
                              "..., 'test_routes': ...} (kdkit distill builds them from llm.multi_teacher.route_by)")
        return None
    if routes is not None:
        raise ConfigError(f"routes are for llm.multi_teacher.mix=route, not mix={cfg.mix}")
    if token_weights is not None:
        return TeacherMix(len(token_weights), "fixed", token_weights) if len(token_weights) > 1 else None
    return TeacherMix(k, cfg.mix, cfg.weights)


class LMDistiller(AcceleratedMethod):
    """Trains a causal LM `student` on token `train_blocks` [n, L] from `teacher` (a frozen HF causal LM), or from
    a teacher-signal `store`, or alone (no-teacher baseline, teacher training); evaluates perplexity on
    `eval_blocks`. `on_step(distiller, step)` runs after every step (tests simulate crashes with it); `fit()`
    runs it in its `Run` and returns the summary.

    Cross-tokenizer mode: `cross` = {"texts": training texts, "batcher": CrossTokenizerBatcher, "teacher_eval_blocks":
    the evaluation text in the teacher's tokens}; `train_blocks` is then None and each step takes whole texts.

    Several teachers: `teacher` is a list (local models and `ServedTeacher`s, one tokenizer), mixed as
    `llm.multi_teacher.mix` says, or routed by `routes` = {"train_routes", "test_routes": each block's teacher}.
    `cross_teachers` (`CrossTeachers`): the teachers among them with another tokenizer, which read whole texts
    through the cross-tokenizer loss: every step when mixed (`train_blocks` is then None), their own steps when
    routed (`RoutedPaths`).
    """

    name = "lm"

    def __init__(self, recipe: Recipe, run_dir, student: nn.Module, tokenizer, train_blocks: torch.Tensor | None,
                 eval_blocks: torch.Tensor, *, teacher: nn.Module | None = None, losses: dict | None = None,
                 store=None, on_step: Callable | None = None, meta: dict | None = None, cross: dict | None = None,
                 routes: dict | None = None, cross_teachers: CrossTeachers | None = None):
        super().__init__(recipe, run_dir, on_step)
        acc = self.accelerator
        self.lcfg = recipe.llm
        self.tokenizer, self.meta, self.store = tokenizer, dict(meta or {}), store
        # token-level KD shares one vocabulary: the signals of this run carry (and the store's are held to) its
        # tokenizer's fingerprint
        self.fingerprint = None
        if cross is None and tokenizer is not None and hasattr(tokenizer, "get_vocab"):
            from .tokenizers import tokenizer_fingerprint

            self.fingerprint = tokenizer_fingerprint(tokenizer)
        losses = {n: (l if isinstance(l, tuple) else (1.0, l)) for n, l in (losses or {}).items()}
        if losses and teacher is None and store is None:
            raise ConfigError(f"losses {sorted(losses)} need a teacher: set teacher.model or teacher.cache")
        self.teacher = self.served = mix = None
        self.teachers, self.routes, self.cross_teachers = None, routes, cross_teachers
        self.token_teachers = None  # mixed across tokenizers: the same-tokenizer teachers with a positive share
        if cross_teachers is not None and not isinstance(teacher, list):
            raise ConfigError("cross_teachers are the teachers (teachers:) with another tokenizer; pass the list")
        if isinstance(teacher, list):
            self.teachers = [t if isinstance(t, ServedTeacher) else t.requires_grad_(False).eval().to(acc.device)
                             for t in teacher]
            shares = None if cross_teachers is None else cross_teachers.shares
            if shares is not None:
                self.token_teachers = [i for i in range(len(teacher)) if i not in cross_teachers.batchers
                                       and shares[i] > 0]
            mix = _teacher_mix(self.lcfg.multi_teacher, len(teacher), routes, cross, store, self.lcfg,
                               None if shares is None else [shares[i] for i in self.token_teachers])
            teacher = self.teachers
        elif isinstance(teacher, ServedTeacher):  # top-k log-probs from a server: a signal source, like a store
            self.served = teacher
        elif teacher is not None:
            teacher.requires_grad_(False)
            self.teacher = teacher.eval().to(acc.device)
        fused = None
        if self.lcfg.fused:
            fused = fused_options(losses)
            next(iter(fused.values()))["chunk_size"] = self.lcfg.chunk_size
            if teacher is None and (store is None or store.kind != "topk"):
                raise ConfigError("llm.fused=true needs a live teacher (teacher.model) or a top-k teacher-signal "
                                  "store (teacher.cache); dense and sampled stores use the unfused path")
        self.cross, self.paths = cross, None
        if cross is not None:
            if self.teacher is None or fused is not None or store is not None or self.lcfg.on_policy.fraction > 0:
                raise ConfigError("cross-tokenizer distillation needs a live teacher (teacher.model), and runs without "
                                  "llm.fused, teacher.cache and on-policy generation")
            n_train, what = len(cross["texts"]), "training texts"
        elif cross_teachers is not None and cross_teachers.owner is None:
            n_train, what = len(cross_teachers.texts), "training texts"
        elif cross_teachers is not None:  # routed: token blocks (may be none) and each ALM teacher's texts
            n_blocks = 0 if train_blocks is None else len(train_blocks)
            paths = {None: torch.arange(n_blocks), **{j: (cross_teachers.owner == j).nonzero().flatten()
                                                      for j in cross_teachers.batchers}}
            self.paths = RoutedPaths(paths, recipe.data.batch_size * acc.num_processes, self.tcfg.seed)
            n_train, what = n_blocks + len(cross_teachers.texts), "training blocks and texts"
        else:
            if train_blocks is None or train_blocks.ndim != 2 or train_blocks.shape[0] == 0:
                raise ConfigError(f"no training blocks (shape {None if train_blocks is None else tuple(train_blocks.shape)})"
                                  f": use more text or a smaller llm.block_size (now {self.lcfg.block_size})")
            n_train, what = len(train_blocks), "training blocks"
        self.train_blocks, self.eval_blocks, self.n_train = train_blocks, eval_blocks, n_train
        self.per_rank = n_train // acc.num_processes
        self.steps_per_epoch = (self.paths.steps_per_epoch if self.paths is not None
                                else self.per_rank // recipe.data.batch_size)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"{n_train} {what} make no batch of data.batch_size="
                              f"{recipe.data.batch_size} on {acc.num_processes} process(es)")
        self.total_steps = self.lcfg.max_steps or self.steps_per_epoch * self.tcfg.epochs
        self.eval_every = self.lcfg.eval_every_steps or self.steps_per_epoch
        self.mixer = None
        if self.lcfg.on_policy.fraction > 0:
            from .on_policy import OnPolicyMixer

            self.mixer = OnPolicyMixer(self.lcfg.on_policy, tokenizer.pad_token_id, tokenizer.eos_token_id,
                                       seed=self.tcfg.seed)
        student.to(acc.device)
        if self.lcfg.gradient_checkpointing and hasattr(student, "gradient_checkpointing_enable"):
            student.gradient_checkpointing_enable()
        for _, loss in losses.values():
            loss.to(acc.device)
        self.wrap(LMStep(student, losses, recipe.ce_weight, fused=fused, mix=mix))
        self.state |= {"step": 0, "epoch": 0, "step_in_epoch": 0, "tokens": 0}

    def modules(self) -> dict[str, nn.Module]:
        mods = {"student": self.raw.student, "losses": self.raw.losses}
        return mods | ({"teacher_mix": self.raw.mix} if self.raw.mix is not None else {})

    # ------------------------------------------------------------ data

    def _batch(self, epoch: int, step: int) -> torch.Tensor:
        """The step's token block indices: a per-epoch permutation (seeded); the step's global batch is the next
        processes x batch_size of it, and this process takes its own contiguous share. So P processes at batch B
        train on exactly the blocks one process at batch P x B does, and DDP's mean of the P gradients is that
        run's gradient. Routed across tokenizers: (path, indices), each step's batch from one path (`RoutedPaths`)."""
        if self.paths is not None:
            return self.paths.batch(epoch, step, self.accelerator.process_index, self.cfg.data.batch_size)
        g = torch.Generator().manual_seed(self.tcfg.seed * 100_003 + epoch)
        perm = torch.randperm(self.n_train, generator=g)
        bs, procs = self.cfg.data.batch_size, self.accelerator.num_processes
        start = (step * procs + self.accelerator.process_index) * bs
        return perm[start:start + bs]

    def _teacher_signal(self, input_ids, attention_mask, index) -> TeacherSignal | None:
        """The step's teacher signal at the shifted positions [B, L-1] (cross-tokenizer: over the teacher's own
        tokens, unshifted): read from the store, or made by the live teacher under inference mode."""
        if self.store is not None:
            from .signal_store import batch_signal

            batch = self.store.rows(index.tolist())
            if not torch.equal(batch["input_ids"], input_ids.cpu()):
                raise ConfigError("the teacher-signal store's token blocks differ from this run's training blocks: "
                                  "build the store from the same data, tokenizer and llm.block_size")
            signal = batch_signal(batch, tokenizer=self.store.meta.get("tokenizer_fingerprint"))
            signal.check_tokenizer(self.fingerprint)
            return signal.to(self.accelerator.device)
        if self.served is not None:
            signal = self.served.topk_signal(input_ids, attention_mask)
            signal.check_tokenizer(self.fingerprint)
            return signal
        if self.teachers is not None:
            return self._teachers_signal(input_ids, attention_mask, index)
        if self.teacher is None:
            return None
        if self.cross is not None:
            side = self.cross_batch["teacher"]
            with torch.inference_mode(), self.accelerator.autocast():
                logits = self.teacher(input_ids=side["input_ids"], attention_mask=side["attention_mask"]).logits
            return CrossTokenizerChunks(logits=logits.clone(), input_ids=side["input_ids"],
                                        chunk_ids=side["chunk_ids"], space_mask=side.get("space_mask"))
        with torch.inference_mode(), self.accelerator.autocast():
            if self.raw.fused is not None:
                from .models import decoder_of, lm_head_of

                h = decoder_of(self.teacher)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
                w, b = lm_head_of(self.teacher)
                # the head is a parameter, not an inference tensor: no per-step copy of its V x H weight
                return HiddenStates(hidden=h[:, :-1].clone(), weight=w.detach(),
                                    bias=None if b is None else b.detach(), tokenizer=self.fingerprint)
            logits = self.teacher(input_ids=input_ids, attention_mask=attention_mask).logits
        return DenseLogits(logits=logits[:, :-1].clone(), tokenizer=self.fingerprint)

    def _one_signal(self, teacher, input_ids, attention_mask) -> TeacherSignal:
        """One teacher's signal at the shifted positions: a served teacher's top-k, a local one's dense logits."""
        if isinstance(teacher, ServedTeacher):
            signal = teacher.topk_signal(input_ids, attention_mask)
            signal.check_tokenizer(self.fingerprint)
            return signal.to(self.accelerator.device)
        with torch.inference_mode(), self.accelerator.autocast():
            logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
        return DenseLogits(logits=logits[:, :-1].clone(), tokenizer=self.fingerprint)

    def _teachers_signal(self, input_ids, attention_mask, index):
        """Routed: each teacher on its own blocks, put back in order (one signal). Mixed: every teacher's signal,
        a list the step mixes (the mixture's weights may be trained)."""
        from .multi_teacher import routed_signal

        if self.routes is None:
            return [self._one_signal(t, input_ids, attention_mask) for t in self.teachers]
        owner = self.routes["train_routes"][index]
        parts = []
        for k, teacher in enumerate(self.teachers):
            rows = (owner == k).nonzero().flatten()
            if len(rows):
                mask = None if attention_mask is None else attention_mask[rows]
                parts.append((rows, self._one_signal(teacher, input_ids[rows], mask)))
            self.state.setdefault("blocks_per_teacher", [0] * len(self.teachers))[k] += len(rows)
        return routed_signal(parts, len(input_ids), self.raw.student.get_output_embeddings().weight.shape[0])

    def _cross_batch(self, index):
        """(student ids, mask, labels) of the step's texts; both sides' aligned batch kept for the teacher and losses."""
        texts = [self.cross["texts"][i] for i in index.tolist()]
        dev = self.accelerator.device
        batch = self.cross["batcher"](texts)
        self.cross_batch = {who: {k: v.to(dev) for k, v in batch[who].items()} for who in ("student", "teacher")}
        side = self.cross_batch["student"]
        ids, mask = side["input_ids"], side["attention_mask"]
        return ids, mask, ids.masked_fill(mask == 0, -100)

    def _alm_batch(self, path: int | None, index):
        """Teachers across tokenizers: (student ids, mask, labels, `TeacherPaths`) of the step's whole texts, aligned
        for each ALM teacher of the step (the routed one, `path`; every one when mixed, beside the same-tokenizer
        teachers' token signals over the student's ids). The student side is the same for every aligner; a teacher
        with no share does not run."""
        ct, dev = self.cross_teachers, self.accelerator.device
        texts = [ct.texts[i] for i in index.tolist()]
        which = [path] if path is not None else [j for j in ct.batchers if ct.shares[j] > 0]
        batches = {j: ct.batchers[j](texts) for j in which or list(ct.batchers)[:1]}
        move = lambda side: {k: v.to(dev) for k, v in side.items()}  # noqa: E731
        s_side = move(next(iter(batches.values()))["student"])
        cross = []
        for j in which:
            side, s_side = move(batches[j]["teacher"]), move(batches[j]["student"])
            with torch.inference_mode(), self.accelerator.autocast():
                logits = self.teachers[j](input_ids=side["input_ids"], attention_mask=side["attention_mask"]).logits
            chunks = CrossTokenizerChunks(logits=logits.clone(), input_ids=side["input_ids"],
                                          chunk_ids=side["chunk_ids"], space_mask=side.get("space_mask"))
            cross.append((f"teacher{j}", 1.0 if path is not None else ct.shares[j], chunks, s_side))
        ids, mask = s_side["input_ids"], s_side["attention_mask"]
        token, share = None, 0.0
        if path is not None:
            self.state.setdefault("texts_per_teacher", [0] * len(self.teachers))[path] += len(index)
        elif self.token_teachers:
            signals = [self._one_signal(self.teachers[k], ids, mask) for k in self.token_teachers]
            token = signals if len(signals) > 1 else signals[0]
            share = sum(ct.shares[k] for k in self.token_teachers)
        return ids, mask, ids.masked_fill(mask == 0, -100), TeacherPaths(token, share, cross)

    # ------------------------------------------------------------ the method contract

    def prepare(self, run, resuming: bool) -> None:
        if not resuming:
            self.state["student_ppl_before"] = self.perplexity()["ppl"]
            if self.teacher is not None and self.cross is not None:
                # the teacher's own tokens: a different unit from the student's, so not comparable number for number
                self.state["teacher_ppl_own_tokens"] = self.perplexity(
                    self.teacher, self.cross["teacher_eval_blocks"])["ppl"]
            elif self.teacher is not None or self.served is not None:
                self.state["teacher_ppl"] = self.perplexity(self.teacher or self.served)["ppl"]
            if self.teachers is not None:  # each teacher's (in its own tokens), on each route's blocks when routed
                own = self.cross_teachers.eval_blocks if self.cross_teachers is not None else {}
                self.state["teachers_ppl"] = [self.perplexity(t, own.get(i))["ppl"]
                                              for i, t in enumerate(self.teachers)]
                if self.routes is not None:
                    self.state["teachers_ppl_by_route"] = [[self.perplexity(t, blocks)["ppl"]
                                                            for blocks in self._route_blocks(i)]
                                                           for i, t in enumerate(self.teachers)]
                run.log("teachers' perplexity: " + ", ".join(
                    f"teachers.{i} {p:.3f}" + (" (over its own tokens)" if i in own else "")
                    for i, p in enumerate(self.state["teachers_ppl"])))
            run.log("perplexity before training: student {:.3f}{}{}".format(
                self.state["student_ppl_before"],
                f", teacher {self.state['teacher_ppl']:.3f}" if "teacher_ppl" in self.state else "",
                f", teacher {self.state['teacher_ppl_own_tokens']:.3f} (over its own tokens)"
                if "teacher_ppl_own_tokens" in self.state else ""))
        self._t0, self._tokens = time.perf_counter(), 0  # tokens/s: this process's own time since the last record

    def batches(self, start: int):
        """(step, block indices) from `start` on: epoch e's order is fixed by (seed, e), so a resumed run draws
        exactly what the uninterrupted one drew."""
        step = start
        while True:
            yield step, self._batch(*divmod(step, self.steps_per_epoch))
            step += 1

    def step(self, item) -> dict:
        step, index = item
        path, teacher = None, None
        if self.paths is not None:
            path, index = index
        acc = self.accelerator
        self._lr = lr = self.schedule(step)
        for loss in self.raw.losses.values():
            if hasattr(loss, "set_progress"):
                loss.set_progress(step / self.total_steps)
        if self.cross is not None:
            ids, mask, labels = self._cross_batch(index)
        elif self.cross_teachers is not None and (self.paths is None or path is not None):
            ids, mask, labels, teacher = self._alm_batch(path, index)
        else:
            ids = self.train_blocks[index].to(acc.device)
            mask, labels = None, ids
        on_policy = False
        if self.mixer is not None:
            mixed = self.mixer.maybe_generate(self.raw.student, ids, None, step)
            ids, mask, labels = mixed["input_ids"], mixed["attention_mask"], mixed["labels"]
            on_policy = bool(mixed["on_policy"])
            self.state["on_policy_steps"] = self.state.get("on_policy_steps", 0) + int(on_policy)
        if teacher is None:
            teacher = self._teacher_signal(ids, mask, index)
        sync = (step + 1) % self.tcfg.grad_accum == 0
        s_features = None if self.cross is None else self.cross_batch["student"]
        terms = self.backward(lambda: self.module(ids, mask, labels, teacher, not on_policy, s_features), sync)
        n_tok = int(ids.numel() if mask is None else mask.sum()) * acc.num_processes
        self._tokens += n_tok
        self.state["tokens"] += n_tok
        self.state["step"] = step + 1
        self.state["epoch"], self.state["step_in_epoch"] = divmod(step + 1, self.steps_per_epoch)
        return {**terms, "lr": lr}

    def is_save_step(self, step: int) -> bool:
        every = self.tcfg.save_every_steps
        return self.is_eval_step(step) or bool(every and step % every == 0)

    def evaluate(self, run, step: int) -> dict:
        """Test perplexity, with the mean loss terms, learning rate and tokens/s since the last record."""
        seconds = time.perf_counter() - self._t0
        self.state["train_seconds"] += seconds
        ev = self.perplexity()
        record = {"epoch": step, "step": step, "lr": self._lr, "tokens_per_s": self._tokens / max(seconds, 1e-9),
                  "test_ppl": ev["ppl"]}
        record |= {f"train_{k}": v for k, v in self.window.means(self.accelerator).items()}
        if self.routes is not None:
            record["test_ppl_by_route"] = [self.perplexity(blocks=b)["ppl"] for b in self._route_blocks()]
        shares = None if self.cross_teachers is None else self.cross_teachers.shares
        if shares is not None or self.raw.mix is not None:
            weights = shares if shares is not None else self.raw.mix.weights().detach()
            record["teacher_weights"] = [round(float(w), 6) for w in weights]
        self.state["history"].append(record)
        run.log(f"step {step}/{self.total_steps}  " + "  ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
            if k not in ("epoch", "step")))
        self._t0, self._tokens = time.perf_counter(), 0
        return record

    def _route_blocks(self, teacher: int | None = None) -> list[torch.Tensor]:
        """The evaluation blocks of each route (teacher), in teacher order: in the student's tokens, or in the own
        tokens of `teacher` when it has another tokenizer."""
        if self.cross_teachers is not None and teacher in self.cross_teachers.batchers:
            return self.cross_teachers.eval_blocks_by_route[teacher]
        owner = self.routes["test_routes"]
        return [self.eval_blocks[owner == k] for k in range(len(self.teachers))]

    @torch.no_grad()
    def perplexity(self, model: nn.Module | None = None, blocks: torch.Tensor | None = None) -> dict:
        """exp(mean next-token NLL) over every token of the evaluation blocks, summed over processes."""
        model = model if model is not None else self.raw.student
        was = getattr(model, "training", False)
        if isinstance(model, nn.Module):
            model.eval()
        dev = self.accelerator.device
        nll = torch.zeros((), dtype=torch.float64, device=dev)
        count = nll.clone()
        blocks = self.eval_blocks if blocks is None else blocks
        blocks = blocks[self.accelerator.process_index::self.accelerator.num_processes]
        for i in range(0, len(blocks), self.cfg.data.eval_batch_size):
            ids = blocks[i:i + self.cfg.data.eval_batch_size].to(dev)
            if isinstance(model, ServedTeacher):  # its replies carry each token's own log-prob
                s_nll, n = model.nll(ids)
                nll += s_nll
                count += n
                continue
            with self.accelerator.autocast():
                logits = model(input_ids=ids).logits
            s, y = shift(logits, ids)
            nll += F.cross_entropy(s.flatten(0, 1).float(), y.flatten(), reduction="sum").double()
            count += y.numel()
        stats = self.accelerator.reduce(torch.stack([nll, count]), reduction="sum")
        if isinstance(model, nn.Module):
            model.train(was)
        mean = float(stats[0] / stats[1].clamp(min=1))
        return {"ppl": math.exp(min(mean, 700.0)), "nll": mean, "tokens": int(stats[1])}

    def artefacts(self, run) -> dict:
        """The student in Hugging Face format (RUN/student, LoRA merged), metrics.json, curves.png."""
        acc, history = self.accelerator, self.state["history"]
        final = history[-1] if history else {}
        summary = {
            "student_ppl": final.get("test_ppl"), "student_ppl_before": self.state.get("student_ppl_before"),
            "teacher_ppl": self.state.get("teacher_ppl"), "steps": self.state["step"],
            **({"teacher_ppl_own_tokens": self.state["teacher_ppl_own_tokens"]}
               if "teacher_ppl_own_tokens" in self.state else {}),
            "train_tokens": self.state["tokens"], "train_seconds": self.state["train_seconds"],
            "tokens_per_s": self.state["tokens"] / max(self.state["train_seconds"], 1e-9),
            "eval_tokens": int(self.eval_blocks.numel()), "processes": acc.num_processes, "device": str(acc.device),
        }
        if "on_policy_steps" in self.state:
            summary["on_policy_steps"] = self.state["on_policy_steps"]
        for key in ("teachers_ppl", "teachers_ppl_by_route", "blocks_per_teacher", "texts_per_teacher"):
            if key in self.state:
                summary[key] = self.state[key]
        if self.cross_teachers is not None:  # their perplexities are over their own tokens
            summary["cross_tokenizer_teachers"] = list(self.cross_teachers.batchers)
        for key in ("test_ppl_by_route", "teacher_weights"):
            if key in final:
                summary[key.replace("test_", "student_")] = final[key]
        if acc.is_main_process:
            from .students import merge_lora

            model = merge_lora(self.raw.student)
            with ckpt.atomic_path(self.run_dir / "student") as tmp:
                model.save_pretrained(str(tmp))
                self.tokenizer.save_pretrained(str(tmp))
                (tmp / "kdkit.json").write_text(json.dumps(self.meta, indent=1))
        return self.write_summary(run, summary)


@register_method("distill", "lm")
def lm(ctx: dict) -> LMDistiller:
    """Causal-LM KD, no-teacher LM baselines and LM teacher training (`task: lm`); the recipe's sections (`llm:`
    above all) are its options, `ctx` the LMDistiller's arguments (models, tokenizer, blocks, losses, store)."""
    return LMDistiller(**ctx)
