"""GKD through TRL's trainer (`llm.on_policy.backend: trl`), for prompt -> completion data where it fits.

Why: TRL's `GKDTrainer` (trl.experimental.gkd; Agarwal et al., ICLR 2024) is the reference implementation of
on-policy distillation on chat/instruction data; using it directly keeps kdkit's own loop
(`kdkit.llm.on_policy`) honest and gives users the upstream trainer when its options cover the recipe.

What fits: TRL scores with the generalised JSD only, at loss temperature 1 (its `temperature` is the sampling
temperature), so `fkl` (beta=0), `rkl` (beta=1) and `jsd(beta)` map onto it; other divergences or a loss T != 1
raise ConfigError pointing to backend "kdkit". Examples may be
- plain strings: the first `cfg.prompt_tokens` tokens are the prompt, the rest (+ EOS) the completion, as in
  kdkit's own mixer;
- (prompt, completion) pairs of strings (see `gsm8k_pairs`);
- {"messages": [...]} chats, rendered by the tokenizer's chat template (see `gsm8k_messages`).
All are tokenized here and handed to TRL's collator as `input_ids` + `completion_mask` (see `to_dataset`).
One TRL quirk is corrected (`_batch_normalised`): the loss of on-policy steps is averaged over the generated
tokens, not over the dataset completion's token count.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

from ..config import OnPolicyConfig
from ..errors import ConfigError
from .on_policy import check_on_policy

TRL_DIVERGENCES = {"jsd": None, "fkl": 0.0, "rkl": 1.0}  # divergence -> the beta TRL needs (None: the given one)


def gsm8k_messages(records) -> list[dict]:
    """GSM8K rows {question, answer} as chats: the question from the user, the worked answer from the assistant."""
    return [{"messages": [{"role": "user", "content": r["question"]},
                          {"role": "assistant", "content": r["answer"]}]} for r in records]


def gsm8k_pairs(records) -> list[tuple[str, str]]:
    """GSM8K rows as (prompt, completion) text pairs, for tokenizers without a chat template."""
    return [(f"Question: {r['question']}\nAnswer: ", r["answer"]) for r in records]


def trl_beta(divergence: str, beta: float) -> float:
    """The GKDConfig.beta for a kdkit divergence, or ConfigError when TRL's trainer cannot compute it."""
    if divergence not in TRL_DIVERGENCES:
        raise ConfigError(f"TRL's GKDTrainer only trains the generalised JSD family (jsd, fkl = jsd beta 0, "
                          f"rkl = jsd beta 1); divergence {divergence!r} needs llm.on_policy.backend: kdkit")
    fixed = TRL_DIVERGENCES[divergence]
    if fixed is None and not 0.0 <= beta <= 1.0:
        raise ConfigError(f"jsd beta must be in [0, 1], got {beta}")
    return float(beta if fixed is None else fixed)


def _chat_split(tokenizer, messages) -> tuple[list[int], list[int]]:
    """A chat's tokens split where the last (assistant) turn starts, via the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("chat examples ({'messages': ...}) need a tokenizer with a chat_template; give "
                          "(prompt, completion) pairs or plain strings instead")
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    if not full.startswith(prompt):
        raise ConfigError("the chat template renders the conversation so that it does not start with the "
                          "rendered prompt (add_generation_prompt=True); cannot tell prompt from completion")
    return (tokenizer(prompt, add_special_tokens=False)["input_ids"],
            tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"])


def _split(tokenizer, example, cfg: OnPolicyConfig, i: int) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one example (see the module docstring for the accepted forms)."""
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    if isinstance(example, str):
        ids = tokenizer(example)["input_ids"]
        return ids[:cfg.prompt_tokens], ids[cfg.prompt_tokens:] + eos
    if isinstance(example, (tuple, list)) and len(example) == 2 and all(isinstance(x, str) for x in example):
        return (tokenizer(example[0])["input_ids"],
                tokenizer(example[1], add_special_tokens=False)["input_ids"] + eos)
    if isinstance(example, dict) and "messages" in example:
        return _chat_split(tokenizer, example["messages"])
    raise ConfigError(f"example {i} is a {type(example).__name__}; give strings, (prompt, completion) pairs of "
                      "strings, or {'messages': [...]} chats")


def to_dataset(examples, tokenizer, cfg: OnPolicyConfig, max_length: int):
    """A `datasets.Dataset` of {prompt, input_ids, completion_mask} rows, which TRL's `DataCollatorForChatML`
    takes as they are. Tokenizing here (instead of letting the collator render chats) decides truncation: the
    prompt is kept and the completion cut to `max_length`, where the collator would keep the last tokens and
    can drop the whole prompt."""
    from datasets import Dataset

    examples, rows = list(examples), []
    for i, example in enumerate(examples):
        prompt, completion = _split(tokenizer, example, cfg, i)
        prompt = prompt[:max(1, max_length - 1)]  # leave room for at least one completion token
        ids = (prompt + completion)[:max_length]
        if len(prompt) == 0 or len(ids) <= len(prompt):
            continue  # no prompt to continue, or nothing to learn (a string no longer than the prompt)
        rows.append({"prompt": tokenizer.decode(prompt), "input_ids": ids,
                     "completion_mask": [0] * len(prompt) + [1] * (len(ids) - len(prompt))})
    if not rows:
        raise ConfigError(f"none of the {len(examples)} examples has both prompt and completion tokens "
                          f"(plain strings need more than llm.on_policy.prompt_tokens={cfg.prompt_tokens} tokens)")
    return Dataset.from_list(rows)


def _trl_gkd():
    """TRL's GKD classes: trl.experimental.gkd (TRL >= 0.25) or the top level (older TRL)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # the experimental API is chosen knowingly
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:
        try:
            from trl import GKDConfig, GKDTrainer
        except ImportError as e:
            raise ConfigError("llm.on_policy.backend: trl needs TRL with its GKD trainer: pip install 'kdkit[llm]'"
                              ) from e
    return GKDConfig, GKDTrainer


def _batch_normalised(trainer_cls):
    """GKDTrainer whose loss is averaged over the tokens of the batch it actually scores.

    Why: transformers counts `num_items_in_batch` on the collated labels (the dataset completions) before
    `GKDTrainer.training_step` swaps in the student's generations, and TRL divides the on-policy loss by that
    count, so on-policy steps come out scaled by (#generated tokens / #dataset completion tokens) -- by large
    factors either way with long answers or long prompts. With one micro-batch per optimiser step (no gradient
    accumulation, as here) dropping the count gives TRL's own per-batch "batchmean", i.e. `gkd_loss`.
    """

    class BatchNormalisedGKDTrainer(trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=None)

    return BatchNormalisedGKDTrainer


def build_trl_gkd_trainer(student_model, teacher_model, tokenizer, train_texts, eval_texts, cfg: OnPolicyConfig,
                          *, beta: float = 0.5, T: float = 1.0, lr: float = 5e-5, max_steps: int = 100,
                          batch_size: int = 8, max_length: int = 512, output_dir: str | Path = "runs/trl-gkd",
                          seed: int = 0, divergence: str = "jsd"):
    """TRL's GKDTrainer set up from kdkit's on-policy settings (arguments as in `train_with_trl_gkd`)."""
    check_on_policy(cfg)
    beta = trl_beta(divergence, beta)
    if T != 1.0:
        raise ConfigError(f"TRL's GKDTrainer computes its loss at temperature 1 (GKDConfig.temperature only "
                          f"shapes sampling); loss T={T} needs llm.on_policy.backend: kdkit")
    if tokenizer.pad_token_id is None:
        raise ConfigError("TRL's GKD collator pads batches: the tokenizer needs a pad token (e.g. pad = eos)")
    if max_steps < 1 or batch_size < 1 or max_length < 2:
        raise ConfigError(f"need max_steps >= 1, batch_size >= 1, max_length >= 2; got {max_steps}, {batch_size}, "
                          f"{max_length}")
    GKDConfig, GKDTrainer = _trl_gkd()
    train = to_dataset(train_texts, tokenizer, cfg, max_length)
    evaluate = to_dataset(eval_texts, tokenizer, cfg, max_length) if eval_texts else None
    greedy = cfg.temperature == 0
    # SFTConfig turns checkpointing and bf16 on by default; GKD on arbitrary hardware should assume neither.
    # (transformers 5 renamed gradient_checkpointing, and warns on the old name)
    names = {f.name for f in dataclasses.fields(GKDConfig)}
    ckpt = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    args = GKDConfig(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size, gradient_accumulation_steps=1, learning_rate=lr, seed=seed,
        data_seed=seed, lmbda=cfg.fraction, beta=beta, temperature=1.0 if greedy else cfg.temperature,
        max_new_tokens=cfg.max_new_tokens, seq_kd=False, max_length=max_length,
        **{ckpt: False}, bf16=False, fp16=False,
        report_to="none", push_to_hub=False, save_strategy="no", eval_strategy="no", logging_steps=1,
        disable_tqdm=True, dataloader_pin_memory=False, lr_scheduler_type="constant", warmup_steps=0)
    trainer = _batch_normalised(GKDTrainer)(model=student_model, teacher_model=teacher_model, args=args,
                                            train_dataset=train, eval_dataset=evaluate, processing_class=tokenizer)
    # TRL fixes top_p=1 and do_sample=True; carry kdkit's top_p and greedy choice over to both places it reads
    overrides = {"top_p": cfg.top_p} if not greedy else {"do_sample": False, "top_k": None}
    trainer.generation_kwargs.update(overrides)
    for k, v in overrides.items():
        setattr(trainer.generation_config, k, v)
    return trainer


def train_with_trl_gkd(student_model, teacher_model, tokenizer, train_texts, eval_texts, cfg: OnPolicyConfig, *,
                       beta: float = 0.5, T: float = 1.0, lr: float = 5e-5, max_steps: int = 100,
                       batch_size: int = 8, max_length: int = 512, output_dir: str | Path = "runs/trl-gkd",
                       seed: int = 0, divergence: str = "jsd") -> dict:
    """Distil `teacher_model` into `student_model` (HF causal LMs sharing `tokenizer`) with TRL's GKDTrainer.

    lambda = cfg.fraction; sampling temperature (0 = greedy), top_p and max_new_tokens from `cfg`; `beta` and
    `divergence` as in kdkit's token losses (jsd family only); sequences cut to `max_length` tokens. Returns
    {train_loss (mean over steps), final_loss (last step), train_runtime, steps, eval_loss (teacher-forced JSD on
    `eval_texts`, when given), ...TRL's other train metrics}.
    """
    trainer = build_trl_gkd_trainer(student_model, teacher_model, tokenizer, train_texts, eval_texts, cfg,
                                    beta=beta, T=T, lr=lr, max_steps=max_steps, batch_size=batch_size,
                                    max_length=max_length, output_dir=output_dir, seed=seed, divergence=divergence)
    out = trainer.train()
    metrics = dict(out.metrics)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    metrics.update(train_loss=float(out.training_loss), final_loss=float(losses[-1]) if losses else math.nan,
                   steps=int(trainer.state.global_step))
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    return metrics
