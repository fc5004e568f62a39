"""The CIFAR model zoo, the timm adapter, and Teacher/Student taps on zoo models."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdkit.errors import ConfigError, KdkitError
from kdkit.models import Outputs, Student, Teacher, build_model, check_model, model_names, stage_paths

torch.set_num_threads(2)

ZOO = model_names()

# Parameter counts at 100 classes. "exact": counted by instantiating the reference implementations
# (HobbitLong/RepDistiller models/, which mdistiller's CIFAR models reproduce); "published": the
# figures quoted in the CRD-benchmark literature (in millions).
PARAMS_100 = {
    "resnet20": (278_324, 0.28),
    "resnet32": (472_756, 0.47),
    "resnet56": (861_620, 0.86),
    "resnet110": (1_736_564, 1.73),
    "resnet8x4": (1_233_540, 1.23),
    "resnet32x4": (7_433_860, 7.43),
    "wrn_16_2": (703_284, 0.70),
    "wrn_40_2": (2_255_156, 2.26),
    "vgg8": (3_965_028, 3.96),
    "vgg13": (9_462_180, 9.46),
    "mobilenetv2": (812_836, 0.81),
    "shufflenetv2": (1_355_528, 1.36),
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture
def x():
    torch.manual_seed(0)
    return torch.randn(2, 3, 32, 32)


def test_zoo_lists_every_architecture():
    assert set(PARAMS_100) | {"convnet3"} <= set(ZOO)


@pytest.mark.parametrize("name", ZOO)
def test_builds_with_fc_stages_and_logits(name, x):
    for num_classes in (10, 100):
        model = build_model(name, num_classes=num_classes)
        modules = dict(model.named_modules())
        assert isinstance(modules.get("fc"), nn.Linear) and model.fc.out_features == num_classes
        assert model.stages and all(s in modules for s in model.stages), model.stages
        assert stage_paths(model) == model.stages
        student = Student(model, taps=[*model.stages, "in:fc"])
        out = student(x)
        assert isinstance(out, Outputs) and isinstance(out.logits, torch.Tensor)
        assert out.logits.shape == (2, num_classes)
        assert out.feature("in:fc").shape == (2, model.fc.in_features)
        sides = [out.feature(s).shape[-1] for s in model.stages]
        assert all(out.feature(s).dim() == 4 and out.feature(s).shape[0] == 2 for s in model.stages)
        assert sides == sorted(sides, reverse=True), f"stages not in order: {sides}"


@pytest.mark.parametrize("name", sorted(PARAMS_100))
def test_parameter_counts_match_reference(name):
    exact, published_m = PARAMS_100[name]
    n = n_params(build_model(name, num_classes=100))
    assert n == exact
    assert abs(n / 1e6 - published_m) / published_m < 0.01


def test_convnet3_parameter_count_by_hand():
    w, k, c = 128, 10, 3
    conv = lambda cin: cin * w * 9 + w  # noqa: E731  (weights + bias)
    norm = 2 * w  # GroupNorm(w, w) affine
    expected = conv(c) + 2 * conv(w) + 3 * norm + (w * 4 * 4 * k + k)
    assert expected == 320_010
    assert n_params(build_model("convnet3", num_classes=10)) == expected
    # norm="none" drops the affine norm parameters; batchnorm has the same count as instancenorm
    assert n_params(build_model("convnet3", norm="none")) == expected - 3 * norm
    assert n_params(build_model("convnet3", norm="batchnorm")) == expected
    gn = [m for m in build_model("convnet3").modules() if isinstance(m, nn.GroupNorm)]
    assert len(gn) == 3 and all(m.num_groups == m.num_channels == 128 and m.affine for m in gn)


def test_convnet3_options():
    m = build_model("convnet3", width=32, depth=4, norm="batchnorm", im_size=64)
    assert m.stages == ["layer1", "layer2", "layer3", "layer4"]
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    mnist = build_model("convnet3", in_channels=1, im_size=28)
    assert mnist(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ConfigError, match="instancenorm"):
        build_model("convnet3", norm="layer")


def test_taps_on_resnet8x4(x):
    out = Student(build_model("resnet8x4"), taps=["layer3", "in:fc"])(x)
    assert out.features["layer3"].shape == (2, 256, 8, 8)
    assert out.features["in:fc"].shape == (2, 256)
    assert out.logits.shape == (2, 10)


def test_no_inplace_ops_corrupt_taps(x):
    # bn outputs are followed by ReLU and a residual add; neither may overwrite the tapped tensor.
    out = Student(build_model("resnet8x4"), taps=["layer1.0.bn1", "layer1.0.bn2", "in:layer3.0.relu2"])(x)
    for name, f in out.features.items():
        assert (f < 0).any(), f"{name} was overwritten by a later in-place op"


def test_teacher_is_frozen_and_stays_in_eval(x):
    teacher = Teacher(build_model("resnet8x4"), taps=["layer3", "in:fc"])
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.model.modules())
    out = teacher(x)
    assert not out.logits.requires_grad
    assert all(not f.requires_grad for f in out.features.values())
    assert out.features["layer3"].shape == (2, 256, 8, 8)
    # teacher outputs can enter a student's graph as constants
    student = Student(build_model("resnet20"))
    loss = F.kl_div(F.log_softmax(student(x).logits, 1), F.softmax(out.logits, 1), reduction="batchmean")
    loss.backward()


@pytest.mark.parametrize("name", ZOO)
def test_one_step_gradients_are_finite(name, x):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10).train()
    loss = F.cross_entropy(model(x), torch.tensor([1, 7]))
    loss.backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name}.{pname} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name}.{pname} has a non-finite gradient"


def test_unknown_name_lists_choices():
    with pytest.raises(KeyError, match="Choices") as e:
        build_model("resnet21")
    assert "resnet20" in str(e.value) and "convnet3" in str(e.value)


def test_unknown_option_is_a_config_error():
    with pytest.raises(ConfigError, match="width"):
        build_model("convnet3", widht=3)


@pytest.mark.parametrize("name, options, message", [
    ("resnet9000", {}, "student.model='resnet9000' is not allowed: expected one of airnet, "),
    ("resnet8x4", {"width": -3}, "unknown option 'student.options.width' for model 'resnet8x4'. Allowed: (none)"),
    ("resnet8x4", {"bogus": 1}, "unknown option 'student.options.bogus' for model 'resnet8x4'"),
    ("convnet3", {"width": -3}, "student.options.width=-3 is not allowed: expected an integer >= 1"),
    ("convnet3", {"width": 2.5}, "student.options.width=2.5 is not allowed: expected an integer >= 1"),
    ("convnet3", {"widht": 3}, "Did you mean 'student.options.width'?"),
    ("convnet3", {"norm": "layer"}, "student.options.norm='layer' is not allowed: expected one of 'instancenorm'"),
    ("convnet3", {"im_size": 30}, "student.options.im_size=30 does not fit student.options.depth=3"),
    ("convnet3", {"num_classes": 5}, "student.options.num_classes is not a model option: the dataset sets it"),
    ("mobilenetv2", {"width_mult": 0}, "student.options.width_mult=0 is not allowed: expected a number >= 0.0625"),
    ("wrn_16_2", {"drop_rate": 1}, "student.options.drop_rate=1 is not allowed: expected a number >= 0 and < 1"),
    ("convnet3", [64], "student.options=[64] is not allowed: expected a mapping"),
])
def test_check_model_refuses_in_one_line_without_building(name, options, message, monkeypatch):
    monkeypatch.setattr(torch.nn.Module, "__init__", lambda *a, **k: pytest.fail("check_model built a model"))
    with pytest.raises(ConfigError) as e:
        check_model(name, options, "student")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_check_model_accepts_what_builds():
    for name, options in [("resnet8x4", {}), ("convnet3", {"width": 16, "depth": 4, "im_size": 64}),
                          ("convnet3_w8", {"im_size": 28, "in_channels": 1}), ("mobilenetv2", {"width_mult": 1.0})]:
        check_model(name, options, "teacher")
        build_model(name, num_classes=10, **options)
    with pytest.raises(ConfigError, match="width=0 is not allowed: expected an integer >= 1"):
        build_model("convnet3", width=0)  # build_model runs the same check


def test_check_model_timm_names_are_looked_up_not_built(monkeypatch):
    timm = pytest.importorskip("timm")
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("check_model built a timm model"))
    check_model("timm:resnet18", {"pretrained": False, "drop_rate": 0.1}, "student")
    with pytest.raises(ConfigError, match=r"teachers.1.model=timm:resnet19x: unknown timm model 'resnet19x'"):
        check_model("timm:resnet19x", {}, "teachers.1")
    with pytest.raises(ConfigError, match=r"student.options.pretrained='maybe' is not allowed: expected true"):
        check_model("timm:resnet18", {"pretrained": "maybe"}, "student")


def test_timm_resnet18_on_cifar_input(x):
    pytest.importorskip("timm")
    model = build_model("timm:resnet18", num_classes=10)
    assert model.stages == ["layer1", "layer2", "layer3", "layer4"]
    out = Student(model, taps=["layer4", "in:fc"])(x)
    assert out.logits.shape == (2, 10)
    assert out.features["layer4"].shape == (2, 512, 1, 1)  # stride 32 on 32px input
    assert out.features["in:fc"].shape == (2, 512)


def test_timm_unknown_name():
    pytest.importorskip("timm")
    with pytest.raises(KeyError, match="resnet18"):
        build_model("timm:resnet19x")


def test_timm_pretrained_offline_without_cache_is_a_kdkit_error(monkeypatch, tmp_path):
    pytest.importorskip("timm")
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # huggingface_hub reads the env var at import
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(KdkitError, match="HF_HUB_OFFLINE"):
        build_model("timm:resnet18", num_classes=10, pretrained=True)
