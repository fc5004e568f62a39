"""Held-out next-token scores of a saved model over packed blocks, for the benches that compare finished runs
(the training loop's own evaluation, `LMDistiller.perplexity`, also runs under several processes and for a served
teacher)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def block_scores(model, blocks: torch.Tensor, batch_size: int = 8, keep_top1: bool = False):
    """(perplexity over every next token of `blocks`, the model's top-1 next token at each position or None)."""
    nll, count, preds = 0.0, 0, []
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i:i + batch_size]
        logits = model(input_ids=ids).logits[:, :-1].float()
        if keep_top1:
            preds.append(logits.argmax(-1))
        nll += float(F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
        count += ids[:, 1:].numel()
    return math.exp(nll / max(count, 1)), (torch.cat(preds) if keep_top1 else None)
