"""GKD through TRL's stable `DistillationTrainer` (`llm.on_policy.backend: trl`), for prompt -> completion data.

Why: TRL's `DistillationTrainer` (Agarwal et al., ICLR 2024) is the maintained upstream implementation of
on-policy distillation: a chunked generalised-JSD loss that never materialises the vocabulary logits, and vLLM
generation of the student's continuations. Running it keeps kdkit's own loop (`kdkit.llm.on_policy`) honest and
gives users the upstream trainer when its options cover the recipe.

What fits: TRL scores with the generalised JSD only, M = beta p_teacher + (1 - beta) p_student, without a T^2
factor and with one `temperature` for both the loss and the sampling; so `fkl` (beta=0), `rkl` (beta=1) and
`jsd(beta)` at loss temperature 1 map onto it (`DistillationConfig.temperature = 1`, kdkit's sampling settings
go to `generation_kwargs`); other divergences or a loss T != 1 raise ConfigError pointing to backend "kdkit".

What kdkit adds (`_gkd_trainer`): `DistillationTrainer` generates every batch (GKD's lambda fixed at 1) and
evaluates on its own generations; kdkit's `llm.on_policy.fraction` is lambda, so a step trains on the student's
continuations with probability `fraction` (kdkit's seeded coin, `OnPolicyMixer.is_on_policy`) and on the data
otherwise, and the evaluation is teacher-forced on the held-out completions.

Examples may be
- plain strings: the first `cfg.prompt_tokens` tokens are the prompt, the rest (+ EOS) the completion, as in
  kdkit's own mixer;
- (prompt, completion) pairs of strings (see `gsm8k_pairs`);
- {"messages": [...]} chats, rendered by the tokenizer's chat template (see `gsm8k_messages`).
All are tokenized here (see `to_dataset`); TRL sees the prompt ids, not its own tokenization of the text.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

from ..config import OnPolicyConfig
from ..errors import ConfigError
from .on_policy import OnPolicyMixer, check_on_policy

TRL_DIVERGENCES = {"jsd": None, "fkl": 0.0, "rkl": 1.0}  # divergence -> the beta TRL needs (None: the given one)


def gsm8k_messages(records) -> list[dict]:
    """GSM8K rows {question, answer} as chats: the question from the user, the worked answer from the assistant."""
    return [{"messages": [{"role": "user", "content": r["question"]},
                          {"role": "assistant", "content": r["answer"]}]} for r in records]


def gsm8k_pairs(records) -> list[tuple[str, str]]:
    """GSM8K rows as (prompt, completion) text pairs, for tokenizers without a chat template."""
    return [(f"Question: {r['question']}\nAnswer: ", r["answer"]) for r in records]


def trl_beta(divergence: str, beta: float) -> float:
    """The DistillationConfig.beta for a kdkit divergence, or ConfigError when TRL's trainer cannot compute it."""
    if divergence not in TRL_DIVERGENCES:
        raise ConfigError(f"TRL's DistillationTrainer only trains the generalised JSD family (jsd, fkl = jsd beta 0, "
                          f"rkl = jsd beta 1); divergence {divergence!r} needs llm.on_policy.backend: kdkit")
    fixed = TRL_DIVERGENCES[divergence]
    if fixed is None and not 0.0 <= beta <= 1.0:
        raise ConfigError(f"jsd beta must be in [0, 1], got {beta}")
    return float(beta if fixed is None else fixed)


def check_loss_temperature(T: float, key: str = "the loss T") -> None:
    """ConfigError unless T = 1: TRL's `temperature` also sets the sampling and its loss has no T^2 factor, so
    kdkit's token_kd at another T (Hinton's T^2 gradient scale) is not what it would train."""
    if T != 1.0:
        raise ConfigError(f"{key}={T:g}: TRL's DistillationTrainer scores at temperature 1 here (its temperature "
                          "also sets sampling and has no T^2 factor); use llm.on_policy.backend=kdkit for a loss "
                          "temperature")


def check_vllm(cpu: bool = False) -> None:
    """`llm.on_policy.vllm=true`: TRL's colocated vLLM engine needs a CUDA GPU and the vllm package."""
    import torch

    from .generation_vllm import vllm_available

    if cpu or not torch.cuda.is_available():
        raise ConfigError("llm.on_policy.vllm=true generates with vLLM on a CUDA GPU, and this run has none "
                          "(no CUDA, or trainer.cpu=true): set llm.on_policy.vllm=false")
    if not vllm_available():
        raise ConfigError("llm.on_policy.vllm=true needs the vllm package, which is not installed "
                          "(pip install 'trl[vllm]'): set llm.on_policy.vllm=false")


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
    """A `datasets.Dataset` of {prompt, prompt_ids, completion_ids} rows (`prompt` is the decoded prompt, the
    column TRL requires and logs). Tokenizing here decides truncation: the prompt is kept (up to max_length - 1
    tokens) and the completion cut so that both fit in `max_length`."""
    from datasets import Dataset

    examples, rows = list(examples), []
    for i, example in enumerate(examples):
        prompt, completion = _split(tokenizer, example, cfg, i)
        prompt = prompt[:max(1, max_length - 1)]  # leave room for at least one completion token
        completion = completion[:max_length - len(prompt)]
        if len(prompt) == 0 or len(completion) == 0:
            continue  # no prompt to continue, or nothing to learn (a string no longer than the prompt)
        rows.append({"prompt": tokenizer.decode(prompt), "prompt_ids": prompt, "completion_ids": completion})
    if not rows:
        raise ConfigError(f"none of the {len(examples)} examples has both prompt and completion tokens "
                          f"(plain strings need more than llm.on_policy.prompt_tokens={cfg.prompt_tokens} tokens)")
    return Dataset.from_list(rows)


def _trl_distillation():
    """TRL's stable DistillationConfig and DistillationTrainer (TRL >= 1.16)."""
    try:
        from trl import DistillationConfig, DistillationTrainer
    except ImportError as e:
        raise ConfigError("llm.on_policy.backend: trl needs TRL >= 1.16 (its DistillationTrainer): "
                          "pip install 'kdkit[llm]'") from e
    return DistillationConfig, DistillationTrainer


@functools.cache
def _gkd_trainer():
    """DistillationTrainer with GKD's lambda and a teacher-forced evaluation (see the module docstring).

    Why a subclass: DistillationTrainer generates every batch and has no lambda; the three hooks below are where
    it turns a batch of rows into (prompt ids, completion ids), so replacing them keeps the rest of its step (the
    chunked loss, its normalisation over the scored tokens, vLLM weight sync) as upstream runs it.
    """
    _, DistillationTrainer = _trl_distillation()

    class GKDDistillationTrainer(DistillationTrainer):
        def __init__(self, *args, is_on_policy, **kwargs):
            super().__init__(*args, **kwargs)
            self.is_on_policy, self._rows = is_on_policy, None

        def _generate_and_score_completions(self, inputs):
            self._rows = inputs  # the batch's rows, for the two hooks below
            return super()._generate_and_score_completions(inputs)

        def _tokenize_prompts(self, prompts):
            return [list(r["prompt_ids"]) for r in self._rows], None, {}

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
            if self.model.training and self.is_on_policy(self._step):
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
            return [list(r["completion_ids"]) for r in self._rows]

    return GKDDistillationTrainer


def sampling_kwargs(cfg: OnPolicyConfig) -> dict:
    """kdkit's sampling settings as DistillationConfig.generation_kwargs, which override its own (its
    `temperature` stays 1: it is also the loss temperature). Greedy (temperature 0) is written the way the
    generator reads it: vLLM's SamplingParams(temperature=0), transformers' do_sample=False."""
    if cfg.temperature > 0:
        return {"temperature": cfg.temperature, "top_p": cfg.top_p}
    if cfg.vllm:
        return {"temperature": 0.0}
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


def distillation_args(cfg: OnPolicyConfig, *, beta: float, lr: float, max_steps: int, batch_size: int,
                      max_length: int, output_dir: str | Path, seed: int):
    """The DistillationConfig of a kdkit run (arguments as in `train_with_trl`)."""
    DistillationConfig, _ = _trl_distillation()
    # TRL turns checkpointing and bf16 on by default; distillation on arbitrary hardware should assume neither.
    # (transformers 5 renamed gradient_checkpointing, and warns on the old name)
    names = {f.name for f in dataclasses.fields(DistillationConfig)}
    ckpt = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    vllm = ({"use_vllm": True, "vllm_mode": "colocate", "vllm_max_model_length": max_length + cfg.max_new_tokens}
            if cfg.vllm else {})
    return DistillationConfig(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size, gradient_accumulation_steps=1, learning_rate=lr, seed=seed,
        data_seed=seed, beta=beta, temperature=1.0, generation_kwargs=sampling_kwargs(cfg),
        max_completion_length=cfg.max_new_tokens, disable_dropout=True, **vllm,
        **{ckpt: False}, bf16=False, fp16=False,
        report_to="none", push_to_hub=False, save_strategy="no", eval_strategy="no", logging_steps=1,
        disable_tqdm=True, dataloader_pin_memory=False, lr_scheduler_type="constant", warmup_steps=0)


def _loadable_by_vllm(student, tokenizer, output_dir: str | Path) -> None:
    """Save the student where TRL's colocated vLLM engine builds it from. Why: the engine loads
    `student.name_or_path` and only then receives the student's weights; kdkit's truncated-teacher and scratch
    students are built in memory, so that path names another architecture (the teacher's) or nothing."""
    path = Path(output_dir) / "vllm-student"
    student.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    student.name_or_path = str(path)


def build_trl_trainer(student_model, teacher_model, tokenizer, train_texts, eval_texts, cfg: OnPolicyConfig, *,
                      beta: float = 0.5, T: float = 1.0, lr: float = 5e-5, max_steps: int = 100, batch_size: int = 8,
                      max_length: int = 512, output_dir: str | Path = "runs/trl-distill", seed: int = 0,
                      divergence: str = "jsd"):
    """TRL's DistillationTrainer set up from kdkit's on-policy settings (arguments as in `train_with_trl`)."""
    check_on_policy(cfg)
    beta = trl_beta(divergence, beta)
    check_loss_temperature(T)
    if max_steps < 1 or batch_size < 1 or max_length < 2:
        raise ConfigError(f"need max_steps >= 1, batch_size >= 1, max_length >= 2; got {max_steps}, {batch_size}, "
                          f"{max_length}")
    if cfg.vllm:
        check_vllm()
    coin = OnPolicyMixer(cfg, tokenizer.pad_token_id, tokenizer.eos_token_id, seed=seed).is_on_policy
    train = to_dataset(train_texts, tokenizer, cfg, max_length)
    evaluate = to_dataset(eval_texts, tokenizer, cfg, max_length) if eval_texts else None
    args = distillation_args(cfg, beta=beta, lr=lr, max_steps=max_steps, batch_size=batch_size,
                             max_length=max_length, output_dir=output_dir, seed=seed)
    if cfg.vllm:
        _loadable_by_vllm(student_model, tokenizer, output_dir)
    return _gkd_trainer()(model=student_model, teacher_model=teacher_model, args=args, train_dataset=train,
                          eval_dataset=evaluate, processing_class=tokenizer, is_on_policy=coin)


def train_with_trl(student_model, teacher_model, tokenizer, train_texts, eval_texts, cfg: OnPolicyConfig, *,
                   beta: float = 0.5, T: float = 1.0, lr: float = 5e-5, max_steps: int = 100, batch_size: int = 8,
                   max_length: int = 512, output_dir: str | Path = "runs/trl-distill", seed: int = 0,
                   divergence: str = "jsd") -> dict:
    """Distil `teacher_model` into `student_model` (HF causal LMs sharing `tokenizer`) with TRL's
    DistillationTrainer.

    lambda = cfg.fraction; sampling temperature (0 = greedy), top_p, max_new_tokens and vLLM generation
    (`cfg.vllm`) from `cfg`; `beta` and `divergence` as in kdkit's token losses (jsd family only, T = 1);
    sequences cut to `max_length` tokens. Returns {train_loss (mean over steps), final_loss (last step),
    train_runtime, steps, eval_loss (teacher-forced JSD on `eval_texts`, when given), ...TRL's other train metrics}.
    """
    trainer = build_trl_trainer(student_model, teacher_model, tokenizer, train_texts, eval_texts, cfg, beta=beta,
                                T=T, lr=lr, max_steps=max_steps, batch_size=batch_size, max_length=max_length,
                                output_dir=output_dir, seed=seed, divergence=divergence)
    out = trainer.train()
    metrics = dict(out.metrics)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    metrics.update(train_loss=float(out.training_loss), final_loss=float(losses[-1]) if losses else math.nan,
                   steps=int(trainer.state.global_step))
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    return metrics
