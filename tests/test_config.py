"""Recipes: typed defaults, nested overrides, base inheritance, and errors that name the key and the choices."""
import pytest

from kdkit.config import ConfigError, list_recipes, load_recipe, parse_overrides


def test_recipe_inherits_base_and_applies_overrides():
    r = load_recipe("kd-resnet32x4-resnet8x4", ["trainer.epochs=10", "losses.kd.T=2", "optim.weight_decay=1e-4",
                                                 "scheduler.milestones=[5,8]"])
    assert r.trainer.epochs == 10 and r.scheduler.milestones == [5, 8]
    assert r.losses["kd"] == {"weight": 0.9, "T": 2.0}
    assert r.optim.lr == 0.05 and r.optim.weight_decay == pytest.approx(1e-4)  # base value kept, YAML "1e-4" read
    assert r.student.model == "resnet8x4" and r.teacher.model == "resnet32x4"
    assert r.data.batch_size == 64


def test_overrides_parse_yaml_values():
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]", "e=null", "f=true"]) == \
        {"a": {"b": 1, "c": "x"}, "d": [1, 2], "e": None, "f": True}


@pytest.mark.parametrize("override, message", [
    (["trainer.epoch=3"], "unknown key 'trainer.epoch'. Did you mean 'trainer.epochs'?"),
    (["trainer.epochs=ten"], "trainer.epochs='ten' is not allowed: expected an integer >= 1"),
    (["trainer.epochs=2.5"], "trainer.epochs=2.5 is not allowed: expected an integer"),
    (["optim.name=adam"], "optim.name='adam' is not allowed: expected one of 'sgd', 'adamw'"),
    (["trainer.mixed_precision=fp8"], "expected one of 'no', 'fp16', 'bf16'"),
    (["data.augment=maybe"], "data.augment='maybe' is not allowed: expected true or false"),
    (["losses.kd.T=hot"], "losses.kd.T='hot' is not allowed: expected a number > 0"),
    (["losses.kd.temperature=2"], "unknown option 'losses.kd.temperature' for loss 'kd'"),
    (["losses.kdd.weight=1"], "losses.kdd: unknown loss 'kdd'. Did you mean kd"),
    (["scheduler.milestones=[a]"], "scheduler.milestones[0]='a' is not allowed: expected an integer"),
    (["bogus=1"], "unknown key 'bogus'"),
    (["trainer=3"], "trainer=3 is not allowed: expected a mapping"),
    (["noequals"], "not key=value"),
])
def test_bad_overrides_fail_naming_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_recipe("kd-resnet32x4-resnet8x4", override)
    assert message in str(e.value)


def test_unknown_recipe_lists_choices():
    with pytest.raises(ConfigError, match="unknown recipe 'kd-resnet32x4'.*Available:.*kd-resnet32x4-resnet8x4"):
        load_recipe("kd-resnet32x4")


def test_every_shipped_recipe_validates(tmp_path):
    """Every recipe in recipes/ validates under its own verb's schema (what `kdkit recipes` lists); an image
    distillation recipe, which leaves the teacher to the command line, with a teacher file of its data's shape."""
    import yaml

    from kdkit.diffusion.data import load_real_data
    from kdkit.diffusion.teachers import make_denoiser, save_denoiser

    from kdkit.condense.catalog import KINDS, kind_methods
    from kdkit.condense.resolve import load_condense_config
    from kdkit.config import _raw_recipe, recipe_path, recipe_pillar
    from kdkit.diffusion.run import run_diffusion

    names = list_recipes()
    assert {"kd-resnet32x4-resnet8x4", "dkd-resnet32x4-resnet8x4", "fitnet-resnet32x4-resnet8x4",
            "demo-teacher", "demo-kd", "demo-baseline", "condense-cifar10-dm", "condense-nci1-mirage",
            "diffusion-dmd2-mixture"} <= set(names)
    pillars = {}
    for name in names:
        pillar = recipe_pillar(name)
        pillars[pillar] = pillars.get(pillar, 0) + 1
        if pillar == "distill":
            load_recipe(name)
        elif pillar == "condense":
            raw = _raw_recipe(name)  # a shared base (condense-tu-mirage) names no dataset: any of its kind
            kind = next(k for k in KINDS if raw["method"] in kind_methods(k))
            cfg = load_condense_config(raw.get("dataset", KINDS[kind].datasets[0]), None, [f"recipe={name}"])
            assert cfg.recipe == name
        else:
            assert pillar == "diffusion"
            raw = yaml.safe_load(recipe_path(name).read_text())
            method, data, extra = raw["method"], raw.get("data", "mixture"), []
            if data != "mixture" and method != "train-teacher" and "teacher" not in raw:
                c, h, _ = load_real_data(data, split="test", limit=1).sample_shape
                save_denoiser(make_denoiser("unet", in_channels=c, image_size=h, channels=8, mult=[1], blocks=1,
                                            attn=[]), tmp_path / f"{data}.safetensors")
                extra = [f"teacher={tmp_path / data}.safetensors"]
            assert run_diffusion(method, [f"recipe={name}", *extra], dry_run=True).method == method
    assert set(pillars) == {"distill", "condense", "diffusion"}


def test_a_loss_can_be_added_and_removed_by_override():
    r = load_recipe("kd-resnet32x4-resnet8x4", ["losses.fitnet.weight=100", "losses.kd=null"])
    assert r.losses["fitnet"] == {"weight": 100.0} and r.losses["kd"] is None
    r = load_recipe("kd-resnet32x4-resnet8x4", ["losses.hint2.type=fitnet", "losses.hint2.student_layer=layer1"])
    assert r.losses["hint2"]["type"] == "fitnet"
    # overrides apply in order: an empty mapping clears the recipe's losses, the next one adds a loss
    r = load_recipe("kd-resnet32x4-resnet8x4", ["losses={}", "losses.rkd.weight=2"])
    assert r.losses == {"rkd": {"weight": 2.0}}
    assert load_recipe("kd-resnet32x4-resnet8x4", ["losses.rkd.weight=2", "losses={}"]).losses == {}
