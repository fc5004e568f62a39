"""The Python API in a user's own loop: the README example, Hugging Face taps, cached teachers, several processes."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, SMALL
from kdkit import CachedTeacher, KDLoss, KdkitError, Student, Teacher, build_model, kd_loss
from kdkit.config import load_recipe
from kdkit.train.build import build_distiller


def test_readme_python_example_runs():
    """The README's Python API block is executed as written."""
    text = (REPO / "README.md").read_text().split("## Python API", 1)[-1]  # other sections have examples too
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    assert torch.isfinite(scope["loss"])
    assert all(p.grad is not None for p in scope["student"].parameters() if p.requires_grad)


def test_teacher_is_frozen_and_its_outputs_are_constants():
    teacher = Teacher(build_model("resnet20"), taps=["layer2", "in:fc"])
    teacher.train()
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.parameters())
    out = teacher(torch.randn(4, 3, 32, 32))
    assert out.logits.shape == (4, 10) and not out.logits.requires_grad
    assert out.features["layer2"].shape == (4, 32, 16, 16) and out.features["in:fc"].shape == (4, 64)
    student = Student(build_model("resnet20"))
    s = student(torch.randn(4, 3, 32, 32))
    KDLoss()(s, out).backward()  # teacher tensors mix with autograd


def test_hugging_face_model_with_attention_map_taps():
    """Any HF model wraps as is; `self_attn[1]` taps the attention probabilities of eager attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    teacher = Teacher(LlamaForCausalLM(cfg), taps=["model.layers.1.self_attn[1]", "model.layers.0"])
    student = Student(LlamaForCausalLM(cfg), taps=["model.layers.1.self_attn[1]"])
    ids = torch.randint(0, 64, (2, 8))
    t, s = teacher(ids), student(ids)
    attn = t.features["model.layers.1.self_attn[1]"]
    assert attn.shape == (2, 4, 8, 8)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 4, 8), atol=1e-5)  # rows are distributions
    assert torch.all(attn.triu(1) == 0)  # causal
    assert t.logits.shape == (2, 8, 64) and t.features["model.layers.0"].shape == (2, 8, 32)
    loss = kd_loss(s.logits, t.logits, T=2.0)
    loss.backward()
    assert student.model.lm_head.weight.grad is not None


def test_timm_model_as_teacher():
    teacher = Teacher(build_model("timm:resnet18", num_classes=10), taps=["layer4"])
    out = teacher(torch.randn(2, 3, 32, 32))
    assert out.logits.shape == (2, 10) and out.features["layer4"].shape[:2] == (2, 512)


def test_cached_teacher_serves_stored_logits_and_trains(tmp_path, cifar, teacher_run):
    from kdkit.data.subsets import balanced_subset
    from kdkit.data.transforms import to_float_normalized
    from kdkit.train.build import build_teacher

    train, test = cifar
    recipe = load_recipe("cifar10-240ep", [f"teacher.checkpoint={teacher_run}"])
    live = build_teacher(recipe, 10)
    subset = balanced_subset(train.labels, 50, seed=0)  # the images the recipe below trains on
    cache = CachedTeacher.build(live.model, train.images, tmp_path / "logits.safetensors", batch_size=250,
                                transform=lambda x: to_float_normalized(x, train.mean, train.std), indices=subset)
    loaded = CachedTeacher.load(tmp_path / "logits.safetensors")
    x = to_float_normalized(train.images[subset[:8]], train.mean, train.std)
    assert torch.allclose(loaded(x, index=subset[:8]).logits, live(x).logits, atol=1e-5)
    assert torch.equal(loaded.logits.nan_to_num(), cache.logits.nan_to_num())
    uncached = torch.tensor([i for i in range(3) if i not in set(subset.tolist())])
    with pytest.raises(KdkitError, match="no logits for sample indices"):
        loaded(x[:1], index=uncached[:1])
    r = load_recipe("cifar10-240ep", [f"output_dir={tmp_path}", "name=cached", *SMALL,
                                      f"teacher.cache={tmp_path / 'logits.safetensors'}", "losses.kd.weight=1.0",
                                      "student.model=convnet3", "student.options={width: 8}",
                                      "data.train_per_class=50", "data.batch_size=50", "trainer.epochs=1"])
    summary = build_distiller(r, "distill").fit()
    assert summary["final_acc"] > 10.0


def test_two_process_accelerate_launch_with_frozen_teacher(tmp_path, teacher_run):
    """`accelerate launch` with 2 CPU processes (gloo DDP): a frozen teacher, a FitNet projector, one run folder."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kdkit.cli",
           "distill", "recipe=cifar10-240ep", f"output_dir={tmp_path}", "name=ddp", *SMALL,
           f"teacher.checkpoint={teacher_run}", "student.model=convnet3", "student.options={width: 8}",
           "ce_weight=0.1", "losses.kd.weight=0.9", "losses.fitnet.weight=1.0",
           "losses.fitnet.student_layer=layer2", "losses.fitnet.teacher_layer=layer2",
           "data.train_per_class=40", "data.batch_size=20", "trainer.epochs=2", "data.test_limit=200"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "processes=2" in proc.stdout
    import json

    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["summary"]["processes"] == 2 and len(metrics["history"]) == 2
    # 400 images / 2 processes / batch 20 = 10 steps per epoch on each process
    assert metrics["summary"]["steps"] == 20
    assert (tmp_path / "ddp" / "model.safetensors").is_file()


def test_tapped_values_survive_later_inplace_ops():
    """A later in-place op in the forward (timm's `x += shortcut`) must not change what was tapped."""
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = self.a(x)
            h += 1.0
            return self.b(h)

    student = Student(Net(), taps=["a"])
    x = torch.randn(3, 4)
    out = student(x)
    assert torch.allclose(out.features["a"], student.model.a(x))
    out.features["a"].sum().backward()  # gradients still flow through the tap
    assert student.model.a.weight.grad is not None
