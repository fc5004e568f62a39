"""Stage 4 of rationale distillation: learn from the teacher's incorrect rationales too (REDI).

Xu et al. 2025, "Harnessing Negative Signals: Reinforcement Distillation from Teacher Data for LLM Reasoning"
(REDI). After SFT on the correct traces, a reference-free objective over (question, correct trace y+, incorrect
trace y-) pairs:

    L = - log pi(y+ | x) / |y+|  +  alpha * log pi(y- | x) / |y-|,      alpha in [0, 1] (paper: 0.8)

length-normalised sequence log-likelihoods, the negative term weighted lower so that pushing the incorrect
traces down does not collapse the model (the failure of the symmetric alpha = 1 objective the paper reports).
No reference model is kept (unlike DPO). The loss is a sum of a positive and a negative term, so each is
back-propagated on its own: only one batch's [B, T, vocab] logits are alive at a time, and the token
log-probabilities come from a gather minus a logsumexp rather than a full log-softmax copy.

A weak teacher has few questions with both kinds of trace; `cot.redi_reference_positives` then pairs its incorrect
traces with the dataset's own rationale of the same question (a human-written correct trace), so the negatives
still teach something.
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import MANIFEST, load_checkpoint, save_checkpoint
from ..errors import CheckpointError, ConfigError


# REDI's step against SFT's: the authors fine-tune at 5e-5 and run REDI at 1e-6 (experiments_trl/recipes); the
# negative term is unbounded below, and at lr / 2 it undid most of SFT on kdkit's chain-sum student (44% -> 10%).
REDI_LR_RATIO = 50.0


def mean_token_logprob(model, input_ids, attention_mask, completion_mask) -> torch.Tensor:
    """[B] mean log-prob of the completion tokens (completion_mask marks them in input_ids) under `model`."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    target, mask = input_ids[:, 1:], completion_mask[:, 1:].to(logits.dtype)
    # log_softmax(x)[t] = x[t] - logsumexp(x): no second [B, T, vocab] tensor kept for backward
    logp = logits.gather(-1, target[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)
    return (logp * mask).sum(1) / mask.sum(1).clamp(min=1)


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"REDI alpha (cot.redi_alpha) must be in [0, 1], got {alpha}")


def redi_loss(pos_logp: torch.Tensor, neg_logp: torch.Tensor, alpha: float = 0.8) -> torch.Tensor:
    """The REDI objective from per-sequence mean log-probs of the correct and the incorrect traces."""
    _check_alpha(alpha)
    return (-pos_logp + alpha * neg_logp).mean()


def build_pairs(correct, incorrect, seed: int = 0, references: dict[int, str] | None = None) -> list[dict]:
    """(question_id, question, positive, negative, positive_source): each incorrect trace paired with a correct
    teacher trace of its question; where the teacher has none, with the dataset's own rationale from `references`
    (question_id -> text), if given. Questions without a positive are left out."""
    rng = random.Random(seed)
    pos: dict[int, list[str]] = {}
    for qid, text in zip(correct["question_id"], correct["rationale"]):
        pos.setdefault(int(qid), []).append(text)
    pairs = []
    for qid, q, text in zip(incorrect["question_id"], incorrect["question"], incorrect["rationale"]):
        qid = int(qid)
        if qid in pos:
            pairs.append({"question_id": qid, "question": q, "positive": rng.choice(pos[qid]), "negative": text,
                          "positive_source": "teacher"})
        elif references and qid in references:
            pairs.append({"question_id": qid, "question": q, "positive": references[qid], "negative": text,
                          "positive_source": "reference"})
    return pairs


def _encode(tokenizer, prompt: str, completion: str, max_length: int):
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
    ids = (p + c)[:max_length]
    return ids, ([0] * len(p) + [1] * len(c))[:max_length]


def _pad(rows, pad_id):
    n = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    att = torch.zeros(len(rows), n, dtype=torch.long)
    comp = torch.zeros(len(rows), n, dtype=torch.long)
    for i, (a, c) in enumerate(rows):
        ids[i, :len(a)], att[i, :len(a)], comp[i, :len(c)] = torch.tensor(a), 1, torch.tensor(c)
    return ids, att, comp


def run_redi(model, tokenizer, pairs: list[dict], prompt_fn, *, alpha: float, epochs: float, lr: float,
             batch_size: int, max_length: int, seed: int, device="cpu", progress: bool = True,
             checkpoint_dir: str | Path | None = None, save_steps: int = 0,
             should_stop: Callable[[], bool] | None = None) -> dict | None:
    """Train `model` on REDI pairs; `prompt_fn(question)` is the chat prompt text. The schedule is the REDI
    authors' (experiments_trl/recipes/redi): AdamW, weight decay 1e-4, 10% linear warmup, then linear decay.

    With `checkpoint_dir`, the loop's whole state (weights, optimiser, schedule, data order, sampler, history) is
    saved there every `save_steps` steps and when `should_stop()` turns true (Ctrl-C; the return value is then
    None), and a call that finds a checkpoint there continues from it exactly."""
    from tqdm.auto import tqdm

    if not pairs:
        raise ConfigError("REDI needs questions with both a correct and an incorrect rationale; there are none "
                          "(sample more per question, set cot.redi_reference_positives=true to pair the teacher's "
                          "incorrect traces with the dataset's rationales, or set cot.redi=false)")
    _check_alpha(alpha)
    g = torch.Generator().manual_seed(seed)
    steps = max(1, math.ceil(epochs * len(pairs) / batch_size))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
    warmup = math.ceil(0.1 * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))
    order, history, start = [], [], 0
    if checkpoint_dir is not None and (Path(checkpoint_dir) / MANIFEST).is_file():
        state = load_checkpoint(Path(checkpoint_dir))
        if (state.get("steps"), state.get("pairs")) != (steps, len(pairs)):
            raise CheckpointError(f"REDI checkpoint {checkpoint_dir} is of another run ({state.get('pairs')} pairs, "
                                  f"{state.get('steps')} steps; this one has {len(pairs)} and {steps}); delete it")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        g.set_state(state["generator"])
        order, history, start = list(state["order"]), list(state["history"]), int(state["step"])

    def save(step: int) -> None:
        save_checkpoint(Path(checkpoint_dir), {
            "step": step, "steps": steps, "pairs": len(pairs), "model": model.state_dict(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "generator": g.get_state(),
            "order": order, "history": history})

    model.train()
    for step in tqdm(range(start, steps), desc="REDI", disable=not progress, initial=start, total=steps):
        if len(order) < batch_size:
            order += torch.randperm(len(pairs), generator=g).tolist()
        batch = [pairs[i] for i in order[:batch_size]]
        order = order[batch_size:]
        prompts = [prompt_fn(b["question"]) for b in batch]
        pos = _pad([_encode(tokenizer, p, b["positive"], max_length) for p, b in zip(prompts, batch)],
                   tokenizer.pad_token_id)
        neg = _pad([_encode(tokenizer, p, b["negative"], max_length) for p, b in zip(prompts, batch)],
                   tokenizer.pad_token_id)
        opt.zero_grad(set_to_none=True)
        # redi_loss = -mean(lp_pos) + alpha * mean(lp_neg): back-propagate the two terms one after the other
        lp_pos = mean_token_logprob(model, *(t.to(device) for t in pos))
        (-lp_pos.mean()).backward()
        lp_neg = mean_token_logprob(model, *(t.to(device) for t in neg))
        (alpha * lp_neg.mean()).backward()
        lp_pos, lp_neg = lp_pos.detach(), lp_neg.detach()
        loss = redi_loss(lp_pos, lp_neg, alpha)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        history.append({"step": step + 1, "loss": loss.item(), "pos_logp": lp_pos.mean().item(),
                        "neg_logp": lp_neg.mean().item()})
        stop = should_stop is not None and should_stop()
        if checkpoint_dir is not None and step + 1 < steps and (stop or (save_steps and (step + 1) % save_steps == 0)):
            save(step + 1)
        if stop and step + 1 < steps:
            model.eval()
            return None
    model.eval()
    return {"steps": steps, "pairs": len(pairs), "history": history}
