"""OFA-KD: the loss by hand and against the official formula, gradients, branch heads for CNN maps and ViT/MLP
tokens, the module on real models, clear errors, and one Distiller step with a timm ViT student."""
import math

import pytest
import torch
from torch.autograd import gradcheck

from kdkit.errors import ConfigError, ShapeMismatchError
from kdkit.losses import LOSSES, ConvBranch, OFALoss, TokenBranch, build_loss, kd_loss, ofa_loss
from kdkit.models import Student, build_model
from kdkit.models.outputs import Outputs
from mathref import close as _close, softmax as _softmax

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


# ---------------------------------------------------------------- the loss


def test_ofa_loss_by_hand():
    # One row, 3 classes, target 1, eps = 1.5, T = 2.
    s, t, y, eps, T = [0.5, 1.0, -1.0], [2.0, 0.0, 1.0], 1, 1.5, 2.0
    ps, pt = _softmax(s, T), _softmax(t, T)
    w = [(pt[c] + (c == y)) ** eps - (c == y) for c in range(3)]  # target (1 + p)^eps - 1, others p^eps
    expected = -sum(w[c] * math.log(ps[c]) for c in range(3))
    _close(ofa_loss(torch.tensor([s]), torch.tensor([t]), torch.tensor([y]), eps=eps, T=T), expected, rel=1e-6)
    # Two rows are averaged.
    s2, t2, y2 = [0.0, -2.0, 1.0], [1.0, 1.0, -3.0], 0
    ps2, pt2 = _softmax(s2), _softmax(t2)
    row2 = -sum(((pt2[c] + (c == y2)) ** eps - (c == y2)) * math.log(ps2[c]) for c in range(3))
    row1 = -sum(((_softmax(t)[c] + (c == y)) ** eps - (c == y)) * math.log(_softmax(s)[c]) for c in range(3))
    _close(ofa_loss(torch.tensor([s, s2]), torch.tensor([t, t2]), torch.tensor([y, y2]), eps=eps), (row1 + row2) / 2,
           rel=1e-6)


def test_eps_one_is_soft_label_cross_entropy():
    """eps = 1: -sum p_t log p_s = KL(p_t || p_s) + H(p_t), whatever the labels."""
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g, dtype=torch.float64)
    for T in (1.0, 3.0):
        p_t = torch.softmax(t / T, -1)
        entropy = float(-(p_t * p_t.log()).sum(-1).mean())
        expected = float(kd_loss(s, t, T=T)) / T**2 + entropy
        for y in (torch.zeros(6, dtype=torch.long), torch.arange(6)):
            _close(ofa_loss(s, t, y, eps=1.0, T=T), expected, rel=1e-12)


def _ref_inputs(B, C, seed):
    g = torch.Generator().manual_seed(seed)
    s = 3 * torch.randn(B, C, generator=g, dtype=torch.float64)
    t = 4 * torch.randn(B, C, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    return s, t, y


# The official ``ofa_loss`` (Hao840/OFAKD @ f7bb896, distillers/ofa.py, with target_mask = one_hot(y)) run in
# float64 on `_ref_inputs`: value and d loss / d student logits at [0, 0], [0, y[0]], [B-1, C-1].
# name: (B, C, seed, eps, T, y, value, grads)
OFFICIAL = {
    "A": (4, 10, 0, 1.0, 1.0, [1, 3, 0, 8], 3.8007765042622887,
          [-7.311747985546236e-06, -0.029091995362807606, 0.008745496442039733]),
    "B": (5, 10, 1, 1.5, 1.0, [6, 8, 1, 5, 7], 3.215101533158395,
          [0.0015209051862617145, -0.08230299605724932, 0.0005986211620778232]),
    "C": (3, 7, 2, 1.2, 2.0, [5, 2, 4], 2.4801872988574654,
          [0.00152669987778927, -0.005931478225064113, -0.002919226889614863]),
    "D": (6, 100, 3, 0.8, 4.0, [34, 92, 52, 83, 65, 95], 11.233276901331173,
          [-0.00040351782758426104, 0.0005068157348942321, 0.00039028790410973295]),
}


@pytest.mark.parametrize("case", sorted(OFFICIAL))
@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_ofa_loss_matches_official(case, dtype, rel):
    B, C, seed, eps, T, y_ref, value, grads = OFFICIAL[case]
    s, t, y = _ref_inputs(B, C, seed)
    assert y.tolist() == y_ref
    s = s.to(dtype).requires_grad_()
    loss = ofa_loss(s, t.to(dtype), y, eps=eps, T=T)
    _close(loss, value, rel=rel)
    loss.backward()
    for got, want in zip([s.grad[0, 0], s.grad[0, y[0]], s.grad[B - 1, C - 1]], grads):
        _close(got, want, rel=rel, abs_=1e-12 if dtype == torch.float64 else 1e-7)


def test_ofa_loss_gradcheck():
    s, t, y = _ref_inputs(3, 5, 7)
    s.requires_grad_()
    for eps, T in [(1.0, 1.0), (1.5, 2.0), (0.7, 1.0)]:
        assert gradcheck(lambda x: ofa_loss(x, t, y, eps=eps, T=T), (s,))


def test_ofa_loss_soft_labels_sequences_and_teacher_detached():
    s, t, y = _ref_inputs(4, 6, 9)
    hard = ofa_loss(s, t, y, eps=1.5)
    soft = 0.9 * torch.nn.functional.one_hot(y, 6).double() + 0.1 / 6  # label smoothing: argmax target
    _close(ofa_loss(s, t, soft, eps=1.5), float(hard), rel=1e-12)
    # [B, L, C] logits with [B, L] targets = the flattened rows.
    _close(ofa_loss(s.reshape(2, 2, 6), t.reshape(2, 2, 6), y.reshape(2, 2), eps=1.5), float(hard), rel=1e-12)
    t = t.clone().requires_grad_()
    ofa_loss(s.requires_grad_(), t, y, eps=1.5).backward()
    assert t.grad is None and s.grad is not None
    low = ofa_loss(s.detach().bfloat16(), t.detach().bfloat16(), y)
    assert low.dtype == torch.float32


def test_ofa_loss_errors():
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ShapeMismatchError, match=r"\(4, 5\).*\(4, 6\)"):
        ofa_loss(s, torch.randn(4, 6), y)
    with pytest.raises(ShapeMismatchError, match="target"):
        ofa_loss(s, t, torch.tensor([0, 1, 2]))
    with pytest.raises(ConfigError, match="eps"):
        ofa_loss(s, t, y, eps=0.0)
    with pytest.raises(ConfigError, match="temperature"):
        ofa_loss(s, t, y, T=-1.0)


# ---------------------------------------------------------------- branch heads


def _count(module, kind):
    return sum(isinstance(m, kind) for m in module.modules())


@pytest.mark.parametrize("c, hw, steps", [(64, 32, 2), (128, 16, 1), (256, 8, 0), (24, 7, 3)])
def test_conv_branch(c, hw, steps):
    branch = ConvBranch(c, 256, 10, steps)
    assert branch(torch.randn(2, c, hw, hw)).shape == (2, 10)
    # stride-2 depthwise-separable blocks down to the last stage; a 1x1 conv when already there
    strided = [m for m in branch.modules() if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
    assert len(strided) == steps
    if steps == 0:
        assert branch.features[0].kernel_size == (1, 1) and branch.features[0].out_channels == 256
    else:
        assert branch.features[-1][-3].out_channels == 256  # the last SepConv ends at `width` channels


@pytest.mark.parametrize(
    "n, dim, prefix, merges, first_token",
    [(65, 64, 1, 0, True),  # ViT at 32x32 with 4x4 patches: 8x8 grid + class token
     (64, 32, 0, 0, False),  # MLP-Mixer / ResMLP: no class token, mean over tokens
     (197, 32, 1, 1, True),  # ImageNet ViT 14x14 + class token: one 2x2 merge to 7x7
     (784, 16, 0, 2, False)],  # 28x28: two merges
)
def test_token_branch(n, dim, prefix, merges, first_token):
    torch.manual_seed(0)
    branch = TokenBranch(n, dim, dim, 10, blocks=2, prefix=prefix)
    x = torch.randn(2, n, dim)
    out = branch(x)
    assert out.shape == (2, 10)
    assert len(branch.merge) == merges and len(branch.blocks) == 2
    # Prefix (class) tokens bypass the merges; the classifier reads the class token, or the token mean without one.
    tokens = torch.cat([x[:, :prefix], branch.merge(x[:, prefix:])], 1) if merges else x
    tokens = branch.blocks(tokens)
    assert tokens.shape[1] == prefix + (int(math.isqrt(n - prefix)) // 2**merges) ** 2
    pooled = tokens[:, 0] if first_token else tokens.mean(1)
    assert torch.allclose(out, branch.head(pooled), atol=1e-6)


def test_token_branch_errors():
    with pytest.raises(ShapeMismatchError, match="not a square grid"):
        TokenBranch(66, 32, 32, 10, blocks=1, prefix=1)
    with pytest.raises(ShapeMismatchError, match="divisible"):
        TokenBranch(65, 30, 30, 10, blocks=1, prefix=1)
    with pytest.raises(ShapeMismatchError, match="odd"):
        TokenBranch(30 * 30, 32, 32, 10, blocks=1)  # 30 -> 15 (odd) needs a second merge


# ---------------------------------------------------------------- the module


def _resnet_outputs(stages=("layer1", "layer2", "layer3"), batch=4):
    torch.manual_seed(0)
    student = Student(build_model("resnet8x4"), taps=list(stages))
    images = torch.randn(batch, 3, 32, 32)
    s_out = student(images)
    t_out = Outputs(torch.randn(batch, 10))
    return s_out, t_out, torch.randint(0, 10, (batch,))


def test_module_on_resnet8x4():
    loss = OFALoss()
    assert loss.student_taps == ("layer1", "layer2", "layer3") and loss.teacher_taps == () and loss.needs_labels
    assert (loss.eps, loss.T, loss.stage_weight, loss.logit_weight) == (1.0, 1.0, 1.0, 1.0)
    s_out, t_out, y = _resnet_outputs()
    with pytest.raises(RuntimeError, match="setup"):
        loss(s_out, t_out, y)
    loss.setup(s_out, t_out)
    # layer1 (64 x 32x32) -> 2 SepConvs, layer2 (128 x 16x16) -> 1, layer3 (256 x 8x8) -> 1x1 conv; width 256
    assert [b.features[0].__class__.__name__ for b in loss.branches] == ["Sequential", "Sequential", "Conv2d"]
    assert all(b.head.in_features == 256 and b.head.out_features == 10 for b in loss.branches)
    branch_logits = loss.branch_logits(s_out)
    assert [tuple(o.shape) for o in branch_logits] == [(4, 10)] * 3
    value = loss(s_out, t_out, y)
    expected = ofa_loss(s_out.logits, t_out.logits, y) + sum(ofa_loss(o, t_out.logits, y) for o in branch_logits)
    _close(value, float(expected.detach()), rel=1e-6)
    value.backward()
    assert all(p.grad is not None for p in loss.parameters())
    weighted = OFALoss(stage_weight=0.5, logit_weight=2.0, eps=1.5)
    weighted.branches, weighted._setup_shapes = loss.branches, loss._setup_shapes
    expected = 2.0 * ofa_loss(s_out.logits, t_out.logits, y, eps=1.5) + 0.5 * sum(
        ofa_loss(o, t_out.logits, y, eps=1.5) for o in branch_logits)
    _close(weighted(s_out, t_out, y), float(expected.detach()), rel=1e-5)
    branches = loss.branches
    loss.setup(s_out, t_out)  # idempotent: keeps the (trained) branches
    assert loss.branches is branches
    with pytest.raises(ValueError, match="labels"):
        loss(s_out, t_out, None)
    with pytest.raises(ValueError, match="teacher"):
        loss(s_out, None, y)
    with pytest.raises(ShapeMismatchError, match="teacher logits"):
        loss(s_out, Outputs(torch.randn(4, 100)), y)
    small = Outputs(s_out.logits, {k: v[:, :, :4, :4] for k, v in s_out.features.items()})
    with pytest.raises(ShapeMismatchError, match="changed since setup"):
        loss(small, t_out, y)


def test_module_registry_and_option_errors():
    assert LOSSES.get("ofa") is OFALoss
    loss = build_loss("ofa", stages="blocks.1, blocks.3", eps=1.5, width=64, prefix_tokens=1)
    assert loss.student_taps == ("blocks.1", "blocks.3") and loss.eps == 1.5
    for opts, msg in [({"stages": " , "}, "at least one"), ({"stages": "layer1,layer1"}, "twice"),
                      ({"eps": 0.0}, "eps"), ({"T": 0.0}, "T=0.0 is not allowed: expected a number > 0"), ({"stage_weight": -1.0}, "weight"),
                      ({"width": -2}, "width"), ({"prefix_tokens": -2}, "prefix_tokens")]:
        with pytest.raises(ConfigError, match=msg):
            OFALoss(**opts)
    # A pooled vector is not a stage: the error names the tap.
    loss = OFALoss(stages="in:fc")
    s = Outputs(torch.randn(2, 10), {"in:fc": torch.randn(2, 256)})
    with pytest.raises(ShapeMismatchError, match=r"stage 'in:fc' gives \(2, 256\)"):
        loss.setup(s, Outputs(torch.randn(2, 10)))
    with pytest.raises(KeyError, match="student has no tapped feature 'layer9'"):
        OFALoss(stages="layer9").setup(s, Outputs(torch.randn(2, 10)))
    # Tokens whose count is not prefix + square grid: named.
    loss = OFALoss(stages="blocks.0", prefix_tokens=0)
    s = Outputs(torch.randn(2, 10), {"blocks.0": torch.randn(2, 65, 32)})
    with pytest.raises(ShapeMismatchError, match=r"stage 'blocks.0'.*square"):
        loss.setup(s, Outputs(torch.randn(2, 10)))


def test_module_on_token_features_infers_class_tokens():
    torch.manual_seed(0)
    loss = OFALoss(stages="blocks.0,blocks.1,blocks.2")
    feats = {"blocks.0": torch.randn(3, 65, 32), "blocks.1": torch.randn(3, 65, 32), "blocks.2": torch.randn(3, 65, 32)}
    s, t, y = Outputs(torch.randn(3, 10), feats), Outputs(torch.randn(3, 10)), torch.tensor([1, 2, 3])
    loss.setup(s, t)
    assert [b.prefix for b in loss.branches] == [1, 1, 1]  # 65 = 8x8 + class token
    assert [len(b.blocks) for b in loss.branches] == [2, 1, 1]  # max(n - i, 1), as the reference's 4 - stage
    assert all(b.head.in_features == 32 for b in loss.branches)
    assert torch.isfinite(loss(s, t, y))
    mixer = OFALoss(stages="blocks.0")
    mixer.setup(Outputs(torch.randn(3, 10), {"blocks.0": torch.randn(3, 64, 48)}), t)
    assert mixer.branches[0].prefix == 0


# ---------------------------------------------------------------- timm students on 32x32


def test_timm_vit_and_mlp_students_on_cifar_size():
    """timm ViT-Tiny (4x4 patches) and an MLP-Mixer (4x4 patches) build offline and train with OFA branches."""
    from timm.models.mlp_mixer import MlpMixer

    torch.manual_seed(0)
    vit = build_model("timm:vit_tiny_patch16_224", img_size=32, patch_size=4, depth=4)
    # timm's named Mixer/ResMLP constructors fix patch_size, so a 4x4-patch Mixer is built from the class.
    mixer = MlpMixer(num_classes=10, img_size=32, patch_size=4, num_blocks=2, embed_dim=64)
    for model, stages, n_tokens, prefix in [(vit, "blocks.1,blocks.3", 65, 1), (mixer, "blocks.0,blocks.1", 64, 0)]:
        student = Student(model, taps=stages.split(","))
        images, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 7])
        out = student(images)
        assert out.logits.shape == (2, 10)
        assert out.features[stages.split(",")[0]].shape[1] == n_tokens
        loss = OFALoss(stages=stages)
        loss.setup(out, Outputs(torch.randn(2, 10)))
        assert all(b.prefix == prefix for b in loss.branches)
        loss(out, Outputs(torch.randn(2, 10)), y).backward()
        assert all(p.grad is not None for p in model.blocks[0].parameters())  # branch losses reach the student
        assert all(p.grad is not None for p in loss.parameters())


def test_distiller_step_cnn_teacher_vit_student(tmp_path, cifar):
    """One epoch of two steps: a random ConvNet teacher's logits distilled into a small timm ViT with OFA."""
    from kdkit.config import load_recipe
    from kdkit.data.subsets import balanced_subset
    from kdkit.train.distiller import Distiller

    from conftest import SMALL

    train, test = cifar
    cfg = load_recipe("cifar10-240ep", [f"output_dir={tmp_path}", *SMALL, "data.batch_size=16", "trainer.epochs=1",
                                        "data.test_limit=32", "optim.name=adamw", "optim.lr=1e-3",
                                        "optim.weight_decay=0.05"])
    torch.manual_seed(0)
    teacher = build_model("convnet3", width=8)
    student = build_model("timm:vit_tiny_patch16_224", img_size=32, patch_size=4, depth=3, embed_dim=48)
    loss = OFALoss(stages="blocks.0,blocks.1,blocks.2")
    d = Distiller(student, teacher, {"ofa": (1.0, loss)}, train, test, cfg, tmp_path / "run",
                  train_indices=balanced_subset(train.labels, 4))
    before = {k: v.clone() for k, v in d.raw.losses.state_dict().items()}
    assert any(k.startswith("ofa.branches.0.blocks") for k in before)
    summary = d.fit()
    hist = d.state["history"][-1]
    assert math.isfinite(hist["train_ofa"]) and hist["train_ofa"] > 0 and math.isfinite(hist["train_ce"])
    after = d.raw.losses.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the branch heads were trained
    assert 0.0 <= summary["final_acc"] <= 100.0
