"""The teacher's top-k cache of CoT SFT: the teacher's own top-k at every position whatever the padding, one
forward per distinct sequence, and at k = V the same KD loss and gradient as the live teacher's logits."""
import pytest
import torch

from kdkit.llm.cot_sft import completion_losses
from kdkit.llm.topk_cache import TeacherTopKCache

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

V = 40


@pytest.fixture(scope="module")
def teacher():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _batch(seqs, left: bool):
    length = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        sl = slice(length - len(s), length) if left else slice(0, len(s))
        ids[i, sl], mask[i, sl] = torch.tensor(s), 1
    return ids, mask


def test_the_teachers_topk_at_every_position_whatever_the_padding(teacher):
    seqs = [[5, 6, 7, 8, 9], [11, 12, 13], [5, 6, 7, 8, 9]]
    cache = TeacherTopKCache(teacher, k=4)
    right = cache.signal(*_batch(seqs, left=False))
    assert cache.forwards == 3  # the repeat in the batch is not known yet: computed, then stored once
    assert len(cache.rows) == 2
    left = cache.signal(*_batch(seqs[:2], left=True))
    assert cache.forwards == 3  # reused under another padding side
    for i, s in enumerate(seqs[:2]):
        with torch.no_grad():
            lp = teacher(input_ids=torch.tensor([s])).logits[0].log_softmax(-1)
        want_lp, want_ids = lp.topk(4, dim=-1)
        assert torch.equal(right.indices[i, : len(s)], want_ids)
        assert torch.allclose(right.logprobs[i, : len(s)], want_lp, atol=1e-5)
        assert torch.equal(left.indices[i, -len(s):], want_ids)
    # padding positions hold a uniform placeholder (masked by the labels)
    assert torch.allclose(right.logprobs[1, 3:].exp().sum(-1), torch.ones(2))


def test_at_k_equal_to_the_vocabulary_the_kd_loss_is_the_live_teachers(teacher):
    torch.manual_seed(1)
    ids, mask = _batch([[3, 4, 5, 6, 7, 8], [9, 10, 11, 12]], left=False)
    labels = ids.clone()
    labels[:, :2] = -100
    labels[mask == 0] = -100
    weights = torch.ones(2)
    with torch.no_grad():
        live = teacher(input_ids=ids, attention_mask=mask).logits
    s1 = torch.randn(2, ids.shape[1], V, dtype=torch.float32, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_(True)
    full = TeacherTopKCache(teacher, k=V).signal(ids, mask)
    from kdkit.signals import TopK

    shifted = TopK(indices=full.indices[:, :-1], logprobs=full.logprobs[:, :-1], temperature=1.0, tail="uniform")
    for div in ("fkl", "rkl", "jsd"):
        a, pa = completion_losses(s1, labels, weights, live, 1.0, div)
        b, pb = completion_losses(s2, labels, weights, shifted, 1.0, div)
        assert float(pa["kd"]) > 0 and float(pa["kd"]) == pytest.approx(float(pb["kd"]), rel=1e-5)
        ga, = torch.autograd.grad(a, s1)
        gb, = torch.autograd.grad(b, s2)
        assert torch.allclose(ga, gb, atol=1e-6)


def test_the_loss_on_kept_positions_equals_the_loss_on_all_logits(teacher):
    """SFT computes logits only where some row's next token is a completion token (`logits_to_keep`): the same
    loss and gradient as from the full [B, L, V] logits, with live and cached teachers."""
    from kdkit.llm.cot_sft import predicting_positions

    ids, mask = _batch([[3, 4, 5, 6, 7, 8, 9], [9, 10, 11, 12]], left=False)
    labels = ids.clone()
    labels[0, :4], labels[1, :2] = -100, -100  # prompts
    labels[mask == 0] = -100
    keep = predicting_positions(labels)
    assert keep.tolist() == [1, 2, 3, 4, 5]
    weights = torch.tensor([1.0, 0.5])
    student = teacher  # any causal LM: the gradient is checked on its parameters
    with torch.no_grad():
        t_full = teacher(input_ids=ids, attention_mask=mask).logits
        t_kept = teacher(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
    cache = TeacherTopKCache(teacher, k=8).signal(ids, mask)
    from kdkit.signals import TopK

    for t_all, t_sel in ((t_full, t_kept), (TopK(indices=cache.indices[:, :-1], logprobs=cache.logprobs[:, :-1],
                                                 temperature=1.0, tail="uniform"),
                                            TopK(indices=cache.indices[:, keep], logprobs=cache.logprobs[:, keep],
                                                 temperature=1.0, tail="uniform"))):
        full, _ = completion_losses(student(input_ids=ids, attention_mask=mask).logits, labels, weights, t_all, 0.5)
        g_full = torch.autograd.grad(full, list(student.parameters()))
        kept, _ = completion_losses(student(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits,
                                    labels[:, keep + 1], weights, t_sel, 0.5, aligned=True)
        g_kept = torch.autograd.grad(kept, list(student.parameters()))
        assert float(kept) == pytest.approx(float(full), rel=1e-6)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_full, g_kept))
