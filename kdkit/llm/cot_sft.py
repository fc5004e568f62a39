"""Stage 3 of rationale distillation: supervised fine-tuning of the student on (question -> rationale -> answer).

Training data (`build_sft_examples`, a `datasets.Dataset` of conversational prompt / completion / weight):
- ``rationale``: every kept teacher rationale (SCoTD: several sampled rationales per question), ending in
  "The answer is N.";
- ``answer_only``: the same questions, the gold answer alone: the no-rationale baseline;
- ``reference``: the dataset's own rationales, no teacher (`kdkit train`: fine-tuning a task's teacher);
- ``step_by_step``: Distilling Step-by-Step (Hsieh et al. 2023): two tasks told apart by a prefix, "[label]"
  -> the answer and "[rationale]" -> the rationale; loss = label loss + rationale_weight * rationale loss; the
  student answers with the "[label]" prefix at test time, so rationales shape it without costing tokens;
- ``short_ratio`` > 0 (Mix Distillation, Li et al. 2025): that fraction of questions uses the dataset's own short
  rationale (GSM8K's, calculator notes removed) instead of the teacher's long ones.

Training runs on TRL's `SFTTrainer` (chat template, completion-only loss, the loop, checkpoints, LoRA models from
peft). Its loss is replaced by kdkit's: completion-token cross-entropy weighted per example (the step-by-step
task weights), plus, with `kd_weight` > 0, token-level KD from the teacher on the completion tokens (kdkit's
`token_kd_loss`; teacher and student must share a tokenizer).
"""
from __future__ import annotations

import random
import re
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .answers import strip_calculator_notes

LABEL_PREFIX, RATIONALE_PREFIX = "[label] ", "[rationale] "


def answer_sentence(gold: str) -> str:
    return f"The answer is {gold}."


def with_answer_sentence(rationale: str, gold: str) -> str:
    """The rationale ending in one canonical 'The answer is N.' line (teachers phrase the ending many ways)."""
    text = rationale.strip()
    last = text.rsplit("\n", 1)[-1]
    if re.search(r"answer", last, re.IGNORECASE) or last.startswith("####"):
        text = text[: len(text) - len(last)].rstrip()
    return (text + "\n" + answer_sentence(gold)).strip()


def reference_rationale(answer: str, gold: str) -> str:
    """GSM8K's own (short) rationale: calculator notes removed, '#### N' -> 'The answer is N.'"""
    body = strip_calculator_notes(answer).rsplit("####", 1)[0].strip()
    return (body + "\n" + answer_sentence(gold)).strip()


def eval_prefix(mode: str) -> str:
    """The prompt prefix the student answers with at test time."""
    return LABEL_PREFIX if mode == "step_by_step" else ""


def eval_instruction(mode: str, instruction: str) -> str:
    return "" if mode in ("answer_only", "step_by_step") else instruction


def _turn(prompt: str, completion: str, weight: float) -> dict:
    return {"prompt": [{"role": "user", "content": prompt}],
            "completion": [{"role": "assistant", "content": completion}], "weight": float(weight)}


def build_sft_examples(correct, questions, mode: str, instruction: str, *, rationale_weight: float = 1.0,
                       short_ratio: float = 0.0, seed: int = 0):
    """The SFT dataset for `mode` from the kept rationales (`correct`) and the question set (`questions`)."""
    import datasets

    if mode not in ("rationale", "answer_only", "step_by_step", "reference"):
        raise ConfigError(f"cot.sft must be rationale, answer_only, step_by_step or reference, got {mode!r}")
    if not 0.0 <= short_ratio <= 1.0:
        raise ConfigError(f"cot.short_ratio must be in [0, 1], got {short_ratio}")
    rows = []
    if mode == "answer_only":
        for q, gold in zip(questions["question"], questions["final_answer"]):
            rows.append(_turn(q.strip(), answer_sentence(gold), 1.0))
    elif mode == "reference":  # the dataset's own rationales: how a task's teacher is fine-tuned
        for q, answer, gold in zip(questions["question"], questions["answer"], questions["final_answer"]):
            q = q.strip()
            rows.append(_turn(f"{q}\n{instruction}" if instruction else q, reference_rationale(answer, gold), 1.0))
    else:
        rng = random.Random(seed)
        short = {i for i in range(len(questions)) if rng.random() < short_ratio}
        by_q: dict[int, list[tuple[str, str]]] = {}
        for qid, text, gold in zip(correct["question_id"], correct["rationale"], correct["gold"]):
            by_q.setdefault(int(qid), []).append((with_answer_sentence(text, gold), gold))
        for i in sorted(short):
            by_q[i] = [(reference_rationale(questions[i]["answer"], questions[i]["final_answer"]),
                        questions[i]["final_answer"])]
        for qid in sorted(by_q):
            q = questions[qid]["question"].strip()
            for rationale, gold in by_q[qid]:
                if mode == "rationale":
                    rows.append(_turn(f"{q}\n{instruction}" if instruction else q, rationale, 1.0))
                else:
                    rows.append(_turn(LABEL_PREFIX + q, answer_sentence(gold), 1.0))
                    rows.append(_turn(RATIONALE_PREFIX + q, rationale, rationale_weight))
    if not rows:
        raise ConfigError(f"no SFT examples for cot.sft={mode}: the teacher produced no correct rationale on "
                          f"{len(questions)} questions (see the filter stats). Sample more (cot.samples), use more "
                          "questions, a stronger teacher, or mix in the dataset's rationales (cot.short_ratio > 0)")
    return datasets.Dataset.from_list(rows)


def predicting_positions(labels) -> torch.Tensor:
    """The positions t whose next token t + 1 is a completion token in some row of the batch: the only logits the
    loss reads. Computing just these (``logits_to_keep``) skips the LM head, the largest matmul of a small model,
    on the prompt tokens; with a 49k vocabulary its [B, L, V] logits are most of a step's time and memory."""
    return (labels[:, 1:] != -100).any(0).nonzero()[:, 0]


def completion_losses(logits, labels, weights, teacher=None, kd_weight: float = 0.0, divergence: str = "fkl", *,
                      aligned: bool = False):
    """(total, parts): weighted completion CE over next-token positions (+ kd_weight * token KD on the same ones).

    CE = sum_i w_i * sum_t ce_it / sum_i n_i: a token-level mean in which example i's tokens count w_i times.
    `teacher`: the teacher's logits [B, L, V] over the same ids, or a `TeacherSignal` at the shifted positions.
    ``aligned``: logits (and teacher) [B, K, V] already predict `labels` [B, K] (kept positions, shifted).
    """
    from ..divergence import Divergence
    from ..losses.token import signal_kd_loss
    from ..signals import DenseLogits, TeacherSignal

    s, y = (logits.float(), labels) if aligned else (logits[:, :-1].float(), labels[:, 1:])
    mask = y != -100
    ce = F.cross_entropy(s.flatten(0, 1), y.clamp(min=0).flatten(), reduction="none").view_as(y) * mask
    per_example = ce.sum(1)
    total_tokens = mask.sum().clamp(min=1)
    loss = (weights.to(per_example) * per_example).sum() / total_tokens
    parts = {"ce": (per_example.sum() / total_tokens).detach()}
    if teacher is not None and kd_weight > 0:
        signal = teacher if isinstance(teacher, TeacherSignal) else \
            DenseLogits(logits=(teacher if aligned else teacher[:, :-1]).float())
        kd = signal_kd_loss(s, signal, y, div=Divergence(divergence))
        loss = loss + kd_weight * kd
        parts["kd"] = kd.detach()
    return loss, parts


def run_sft(student, tokenizer, examples, out_dir, *, epochs: float, lr: float, batch_size: int, max_length: int,
            seed: int, teacher=None, kd_weight: float = 0.0, kd_divergence: str = "fkl", kd_topk: int = 0,
            progress: bool = True,
            cpu: bool = True, save_steps: int = 200, should_stop: Callable[[], bool] | None = None,
            bf16: bool | None = None) -> dict | None:
    """Train `student` on `examples` with TRL's SFTTrainer and kdkit's loss; resumes from OUT/checkpoint-*.
    `bf16`: bfloat16 autocast (default: on a GPU only; on a CPU with AVX512-BF16 it trains ~1.6x faster).
    `kd_topk` > 0: KD against the teacher's top-k log-probs of each sequence, computed once and reused by later
    epochs (`TeacherTopKCache`); 0: the teacher's full logits, recomputed every step.

    When `should_stop()` turns true (Ctrl-C), the trainer saves a checkpoint at the current step and stops; the
    return value is then None, and the next call continues from that checkpoint."""
    from pathlib import Path

    from transformers import TrainerCallback
    from transformers.trainer_utils import get_last_checkpoint
    from trl import SFTConfig, SFTTrainer

    from ..signals import TopK
    from .topk_cache import TeacherTopKCache
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    if kd_weight > 0 and teacher is None:
        raise ConfigError("cot.kd_weight > 0 needs the teacher (teacher.model)")

    class WeightCollator(DataCollatorForLanguageModeling):
        def torch_call(self, rows):
            batch = super().torch_call(rows)
            batch["weight"] = torch.tensor([float(r.get("weight", 1.0)) for r in rows])
            return batch

    class KDSFTTrainer(SFTTrainer):
        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if "weight" not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, "weight"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            weights = inputs.pop("weight")
            labels = inputs.pop("labels")
            fwd = {k: inputs[k] for k in ("input_ids", "attention_mask") if k in inputs}
            keep = predicting_positions(labels)
            out = model(**fwd, use_cache=False, logits_to_keep=keep)
            t_logits = None
            if teacher is not None and kd_weight > 0:
                if cache is not None:
                    positions = cache.signal(fwd["input_ids"], fwd.get("attention_mask"))
                    t_logits = TopK(indices=positions.indices[:, keep], logprobs=positions.logprobs[:, keep],
                                    temperature=1.0, tail="uniform")
                else:
                    with torch.no_grad():
                        t_logits = teacher(**fwd, logits_to_keep=keep).logits
            loss, parts = completion_losses(out.logits, labels[:, keep + 1], weights, t_logits, kd_weight,
                                            kd_divergence, aligned=True)
            self._kdkit_parts = {k: float(v) for k, v in parts.items()}
            return (loss, out) if return_outputs else loss

    out_dir = Path(out_dir)
    if isinstance(teacher, torch.nn.Module):
        teacher.eval().requires_grad_(False)
    elif teacher is not None and kd_weight > 0 and kd_topk == 0:
        raise ConfigError("a served teacher gives top-k log-probs: set kd_topk > 0 (cot.kd_topk)")
    cache = TeacherTopKCache(teacher, kd_topk) if teacher is not None and kd_weight > 0 and kd_topk > 0 else None
    args = SFTConfig(output_dir=str(out_dir), num_train_epochs=epochs, per_device_train_batch_size=batch_size,
                     learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=0.05, max_length=max_length,
                     logging_steps=5, save_strategy="steps", save_steps=save_steps, save_total_limit=1,
                     report_to=[], seed=seed, use_cpu=cpu, completion_only_loss=True, bf16=(not cpu) if bf16 is None else bf16,
                     disable_tqdm=not progress, dataloader_num_workers=0)

    class SaveAndStop(TrainerCallback):
        """After a step, when asked to stop: save a checkpoint there and end training."""

        def on_step_end(self, args, state, control, **kwargs):
            if should_stop is not None and should_stop():
                control.should_save = control.should_training_stop = True
            return control

    trainer = KDSFTTrainer(model=student, args=args, train_dataset=examples, processing_class=tokenizer,
                           data_collator=WeightCollator(pad_token_id=tokenizer.pad_token_id), callbacks=[SaveAndStop()])
    last = get_last_checkpoint(str(out_dir)) if out_dir.is_dir() else None
    result = trainer.train(resume_from_checkpoint=last)
    if trainer.state.global_step < trainer.state.max_steps:  # stopped early, a checkpoint saved
        return None
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"train_loss": float(result.training_loss), "steps": int(result.global_step),
            "examples": len(examples), "first_loss": logs[0]["loss"] if logs else None,
            "last_loss": logs[-1]["loss"] if logs else None, "resumed_from": last,
            **({"teacher_forwards": cache.forwards, "kd_topk": kd_topk} if cache is not None else {})}
