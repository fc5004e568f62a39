"""Recipes: a YAML file + `key=value` overrides, validated into typed dataclasses before any work starts."""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


@dataclass
class DataConfig:
    name: str = "cifar10"
    batch_size: int = 64
    eval_batch_size: int = 256
    train_per_class: int | None = None  # balanced subset of the train split (None = all)
    test_limit: int | None = None  # evaluate on a fixed class-balanced subset of N test images (None = all)
    augment: bool = True  # random crop (padding 4) + horizontal flip


@dataclass
class ModelConfig:
    model: str = "resnet8x4"  # a zoo name (`kdkit recipes --models`) or `timm:<name>`
    checkpoint: str | None = None  # safetensors weights (a run folder's model.safetensors)
    options: dict[str, Any] = field(default_factory=dict)  # extra keyword options for the model factory


@dataclass
class TeacherConfig(ModelConfig):
    model: str | None = None
    cache: str | None = None  # stored logits (safetensors) instead of a live teacher


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class SchedulerConfig:
    name: Literal["step", "cosine", "constant"] = "step"
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])  # epochs (step schedule)
    gamma: float = 0.1
    warmup_epochs: float = 0.0  # linear warm-up from 0
    min_lr: float = 0.0  # cosine floor


@dataclass
class TrainerConfig:
    epochs: int = 240
    grad_accum: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 0
    eval_every: int = 1  # epochs
    save_every_steps: int = 0  # extra mid-epoch checkpoints (0 = only at epoch ends)
    keep_checkpoints: int = 2
    log_every: int = 20  # steps between scalar logs
    compile: bool = False  # torch.compile the student step (and the teacher's forward)
    compile_mode: str | None = None  # torch.compile mode: None (default), "reduce-overhead", "max-autotune", ...
    data_on_device: bool = True  # keep the uint8 image tensors on the GPU (150 MB for CIFAR-10): no per-batch copy
    channels_last: bool = False
    cpu: bool = False  # force CPU even when a GPU is present
    progress: bool = True
    threads: int | None = None  # torch intra-op threads (None = torch's default)


@dataclass
class Recipe:
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # several frozen teachers (multi-teacher losses get one `Outputs` per teacher, in this order)
    teachers: list[TeacherConfig] = field(default_factory=list)
    # a second network trained jointly with the student (online distillation: DML, BD-KD); no teacher then
    peer: ModelConfig | None = None
    ce_weight: float = 1.0  # weight of cross-entropy on hard labels
    # name -> {type: registry name (defaults to the key), weight: float, <loss options>}
    losses: dict[str, dict[str, Any]] = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    output_dir: str = "runs"
    name: str | None = None  # run folder name (default: recipe name + time)
    resume: str | None = None  # a run folder or checkpoint folder, or "auto" = latest in the run folder

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- loading


def recipe_path(name: str) -> Path:
    """A recipe by name (`recipes/NAME.yaml`) or by path."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    for d in _recipe_dirs():
        cand = d / f"{name}.yaml"
        if cand.is_file():
            return cand
    names = list_recipes()
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"unknown recipe '{name}'.{hint} Available: {', '.join(names) or 'none'} (in {_recipe_dirs()[0]})")


def _recipe_dirs() -> list[Path]:
    extra = os.environ.get("KDKIT_RECIPES")
    return ([Path(extra)] if extra else []) + [RECIPES_DIR]


def list_recipes() -> list[str]:
    return sorted({p.stem for d in _recipe_dirs() if d.is_dir() for p in d.glob("*.yaml")})


def recipe_description(name: str) -> str:
    """First line of a recipe's `description` (for `kdkit recipes`)."""
    text = str(_read_yaml(recipe_path(name)).get("description", "")).strip()
    return text.splitlines()[0] if text else ""


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of keys to values, got {type(data).__name__}")
    return data


def _raw_recipe(name: str, seen: tuple = ()) -> dict:
    """The recipe's YAML with its `base:` chain merged underneath it."""
    path = recipe_path(name)
    if path in seen:
        raise ConfigError(f"recipe base chain loops: {' -> '.join(map(str, seen + (path,)))}")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    return _merge(_raw_recipe(base, seen + (path,)), data)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), list) and all(str(i).isdigit() for i in v):
            out[k] = _merge_list(out[k], v, k)  # teachers.1.checkpoint=PATH edits one element
        else:
            out[k] = v
    return out


def _merge_list(items: list, edits: dict, key: str) -> list:
    out = list(items)
    for i, v in edits.items():
        i = int(i)
        if not 0 <= i < len(out):
            raise ConfigError(f"override {key}.{i}: '{key}' has {len(out)} element(s) (indices 0..{len(out) - 1})")
        out[i] = _merge(out[i], v) if isinstance(v, dict) and isinstance(out[i], dict) else v
    return out


def parse_overrides(items: list[str]) -> dict:
    """`a.b=1 c=x` -> nested dict; values are parsed as YAML (`x=[1,2]`, `y=null`, `z=1e-3`)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (e.g. trainer.epochs=10)")
        key, _, text = item.partition("=")
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: cannot parse value {text!r}: {e}") from e
        node = out
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override key '{key}' has an empty part")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override of '{p}'")
        node[parts[-1]] = value
    return out


def load_recipe(name: str | None = None, overrides: list[str] | dict | None = None) -> Recipe:
    """Read a named recipe (or none: defaults), apply overrides, validate everything."""
    raw = _raw_recipe(name) if name else {}
    ov = parse_overrides(overrides) if isinstance(overrides, list) else (overrides or {})
    raw = _merge(raw, ov)
    if "name" not in raw and name:
        raw["name"] = None
    recipe = build(Recipe, raw, "")
    validate_losses(recipe.losses)
    return recipe


# ---------------------------------------------------------------- typed building


def build(cls, data: dict, prefix: str):
    """Turn a dict into dataclass `cls`, failing on unknown keys and wrong types with the key's full name."""
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'recipe'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown key '{prefix}{key}'.{hint} Allowed keys here: {', '.join(names)}")
        kwargs[key] = coerce(value, hints[key], f"{prefix}{key}")
    return cls(**kwargs)


def coerce(value, tp, key: str):
    """Check `value` against type `tp` (with the few safe conversions YAML needs) and return it."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value if value is not None else {}, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads 1e-3 as a string
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def validate_losses(losses: dict) -> None:
    """Each loss entry names a registered loss and only options its constructor accepts, of the right types."""
    from .losses import LOSSES  # registers the zoo

    for name, entry in losses.items():
        key = f"losses.{name}"
        if entry is None:
            continue
        if not isinstance(entry, dict):
            raise ConfigError(f"{key}: expected a mapping like {{weight: 1.0, T: 4}}, got {entry!r}")
        kind = entry.get("type", name)
        if kind not in LOSSES:
            close = difflib.get_close_matches(kind, LOSSES.names(), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"{key}: unknown loss '{kind}'.{hint} Choices: {', '.join(LOSSES.names())}")
        coerce(entry.get("weight", 1.0), float, f"{key}.weight")
        factory = LOSSES.get(kind)
        params = loss_params(factory)
        if "inner" in entry and hasattr(factory, "options_for"):  # a wrapper: its options + the inner loss's
            inner = entry["inner"]
            if inner not in LOSSES:
                raise ConfigError(f"{key}.inner: unknown loss {inner!r}; choices: {', '.join(LOSSES.names())}")
            params = factory.options_for(inner)
        for opt, value in entry.items():
            if opt in ("type", "weight"):
                continue
            if opt not in params:
                raise ConfigError(f"unknown option '{key}.{opt}' for loss '{kind}'. "
                                  f"Allowed: type, weight, {', '.join(params) or '(none)'}")
            entry[opt] = coerce(value, params[opt], f"{key}.{opt}")


def loss_params(factory) -> dict[str, Any]:
    """The typed keyword options a loss constructor accepts."""
    sig = inspect.signature(factory)
    hints = typing.get_type_hints(factory.__init__) if inspect.isclass(factory) else typing.get_type_hints(factory)
    return {n: hints.get(n, Any) for n, p in sig.parameters.items()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def dump(recipe: Recipe, path: Path) -> None:
    path.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
