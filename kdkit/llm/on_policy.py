"""On-policy / mixed distillation (GKD; Agarwal et al., "On-Policy Distillation of Language Models: Learning
from Self-Generated Mistakes", ICLR 2024).

Why: a student trained only on fixed text (teacher forcing) never sees the prefixes it produces itself, so at
generation time its own mistakes lead it where it was never taught (exposure bias). GKD mixes in batches whose
continuations the student samples, scored token by token by the teacher: with probability lambda
(`OnPolicyConfig.fraction`) a step trains on student-generated text, otherwise on the data.

`OnPolicyMixer.maybe_generate` makes that choice for one step of kdkit's LM trainer and returns the batch to
train on; `gkd_loss` is GKD's generalised JSD, a thin call to kdkit's token divergence.
"""
from __future__ import annotations

import random

import torch
from torch import Tensor

from ..config import OnPolicyConfig
from ..errors import ConfigError
from ..losses.token import token_kd_loss

IGNORE = -100


def gkd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, beta: float = 0.5,
             T: float = 1.0) -> Tensor:
    """GKD's generalised JSD(beta) per token, averaged over tokens whose label is not -100.

    Logits [B, L, V] and labels [B, L] must already be aligned (shifted: logits at t against the label at t+1).
    beta means the same here, in `token_kd_loss(divergence="jsd")` and in TRL's
    `GKDTrainer.generalized_jsd_loss`: M = beta p_teacher + (1 - beta) q_student,
    JSD = beta KL(p || M) + (1 - beta) KL(q || M); beta = 0 is forward KL(p || q), beta = 1 reverse KL(q || p)
    (Eq. 1 of the paper). The reduction matches TRL's "batchmean" with labels (sum over the unmasked tokens and
    the vocabulary / number of unmasked tokens). Like GKD and TRL, no T^2 factor: kdkit's registered `token_kd`
    loss multiplies by T^2 (Hinton's gradient scale), so `token_kd(jsd) = T^2 * gkd_loss`; both agree at T = 1.
    """
    return token_kd_loss(student_logits, teacher_logits, labels, divergence="jsd", beta=beta, T=T) / (T * T)


def check_on_policy(cfg: OnPolicyConfig) -> None:
    """Fail early, naming the key, on on-policy settings outside their range."""
    if not 0.0 <= cfg.fraction <= 1.0:
        raise ConfigError(f"llm.on_policy.fraction (GKD's lambda) must be in [0, 1], got {cfg.fraction}")
    if cfg.prompt_tokens < 1:
        raise ConfigError(f"llm.on_policy.prompt_tokens must be >= 1, got {cfg.prompt_tokens}")
    if cfg.max_new_tokens < 1:
        raise ConfigError(f"llm.on_policy.max_new_tokens must be >= 1, got {cfg.max_new_tokens}")
    if cfg.temperature < 0:
        raise ConfigError(f"llm.on_policy.temperature must be >= 0 (0 = greedy), got {cfg.temperature}")
    if not 0.0 < cfg.top_p <= 1.0:
        raise ConfigError(f"llm.on_policy.top_p must be in (0, 1], got {cfg.top_p}")


class OnPolicyMixer:
    """Per step: the data batch (probability 1 - fraction) or student continuations of its prompts (fraction).

    The coin and the sampling noise both come from (seed, step) alone, so a resumed run repeats the same choices
    and the same samples, and the global RNG streams (dropout, data order) are left untouched.
    """

    def __init__(self, cfg: OnPolicyConfig, pad_token_id: int | None, eos_token_id: int | None, seed: int = 0):
        check_on_policy(cfg)
        if pad_token_id is None and eos_token_id is None:
            raise ConfigError("on-policy distillation needs a tokenizer with a pad or EOS token (generated "
                              "sequences of different lengths are padded)")
        self.cfg, self.seed = cfg, int(seed)
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id if pad_token_id is not None else eos_token_id

    def _uniform(self, step: int, stream: str) -> float:
        return random.Random(f"kdkit-on-policy:{self.seed}:{step}:{stream}").random()  # str seeds are stable

    def is_on_policy(self, step: int) -> bool:
        """The step's coin: True with probability `fraction` (never at 0, always at 1)."""
        return self._uniform(step, "coin") < self.cfg.fraction

    def maybe_generate(self, student_model, input_ids: Tensor, attention_mask: Tensor | None, step: int) -> dict:
        """{input_ids, attention_mask, labels, on_policy}; labels are token ids (-100 where nothing is learned),
        unshifted: the trainer shifts them against the logits."""
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ConfigError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids "
                              f"{tuple(input_ids.shape)}")
        if not self.is_on_policy(step):
            labels = input_ids.clone()
            if attention_mask is not None:
                labels[attention_mask == 0] = IGNORE
            return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "on_policy": False}
        return {**self.generate(student_model, input_ids, attention_mask, step), "on_policy": True}

    def prompts(self, input_ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """The first `prompt_tokens` real tokens of each row, left-padded (decoder-only generation continues
        from the last column, so every prompt must end there), with their mask."""
        n = self.cfg.prompt_tokens
        if attention_mask is None or bool(attention_mask.all()):
            ids = input_ids[:, :n]
            return ids, torch.ones_like(ids)
        rows = [ids[m.bool()][:n] for ids, m in zip(input_ids, attention_mask)]
        empty = [i for i, r in enumerate(rows) if len(r) == 0]
        if empty:
            raise ConfigError(f"rows {empty} of the batch have no real tokens to use as an on-policy prompt")
        width = max(len(r) for r in rows)
        ids = input_ids.new_full((len(rows), width), self.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = r
            mask[i, width - len(r):] = 1
        return ids, mask

    def generate(self, student_model, input_ids: Tensor, attention_mask: Tensor | None, step: int) -> dict:
        """Student continuations of the step's prompts, repacked right-padded: each row is its prompt, then its
        completion up to and including the first EOS, then padding (mask 0, label -100). Right padding keeps a
        row's positions 0..n-1 as during generation, so a plain forward (no position ids) scores the same text."""
        prompt, prompt_mask = self.prompts(input_ids, attention_mask)
        cfg = self.cfg
        greedy = cfg.temperature == 0
        kwargs = dict(max_new_tokens=cfg.max_new_tokens, do_sample=not greedy, pad_token_id=self.pad_token_id,
                      eos_token_id=self.eos_token_id, use_cache=True)
        if not greedy:  # top_k=0: no top-k cut (HF's default is 50), only temperature and top_p shape sampling
            kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        device = prompt.device
        was_training = student_model.training
        cuda = [device.index or 0] if device.type == "cuda" else []
        student_model.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=cuda):
                torch.manual_seed(int(self._uniform(step, "sample") * 2**62))
                out = student_model.generate(input_ids=prompt, attention_mask=prompt_mask, **kwargs)
        finally:
            student_model.train(was_training)
        sequences = out if torch.is_tensor(out) else out.sequences
        completion = sequences[:, prompt.shape[1]:]
        keep = torch.ones_like(completion, dtype=torch.bool)
        if self.eos_token_id is not None and completion.shape[1] > 0:
            is_eos = completion == self.eos_token_id
            after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
            keep = ~after_eos
        return _repack(prompt, prompt_mask.bool(), completion, keep, self.pad_token_id)


def _repack(prompt: Tensor, prompt_keep: Tensor, completion: Tensor, completion_keep: Tensor, pad: int) -> dict:
    """Rows of [real prompt tokens, kept completion tokens] right-padded; labels only on the completion."""
    ids = torch.cat([prompt, completion], 1)
    keep = torch.cat([prompt_keep, completion_keep], 1)
    is_completion = torch.cat([torch.zeros_like(prompt_keep), completion_keep], 1)
    lengths = keep.sum(1)
    width = int(lengths.max())
    # stable sort moves kept tokens to the front of each row, in order
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]
    ids, is_completion = ids.gather(1, order), is_completion.gather(1, order)
    mask = torch.arange(width, device=ids.device)[None, :] < lengths[:, None]
    ids = torch.where(mask, ids, torch.full_like(ids, pad))
    labels = torch.where(mask & is_completion, ids, torch.full_like(ids, IGNORE))
    return {"input_ids": ids, "attention_mask": mask.long(), "labels": labels}
