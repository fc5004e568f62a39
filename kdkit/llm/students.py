"""Students for LM distillation: a truncated copy of the teacher, a pretrained model, or a fresh config; + LoRA.

A truncated teacher (every k-th layer, first and last kept, as DistilBERT's half-depth student) starts close to
the teacher and shares its tokenizer, so token-level KD applies directly.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import torch

from ..config import LLMConfig, LoRAConfig, ModelConfig, bad_value
from ..errors import ConfigError
from .models import LM_ALIASES, check_lm_name, load_causal_lm, to_dtype, unwrap_peft

STUDENT_KINDS = ("truncated-teacher", "scratch")
PER_LAYER_CONFIG = ("layer_types", "no_rope_layers")  # config lists with one entry per decoder layer


def choose_layers(n_layers: int, layers: int | list[int]) -> list[int]:
    """Teacher layer indices to keep: N evenly spaced including the first and the last, or an explicit list."""
    if isinstance(layers, bool) or not isinstance(layers, (int, list, tuple)):
        raise ConfigError(f"student layers must be a count or a list of layer indices, got {layers!r}")
    if isinstance(layers, int):
        if not 1 <= layers <= n_layers:
            raise ConfigError(f"student layers={layers}: the teacher has {n_layers} layers; choose 1..{n_layers}")
        if layers == 1:
            return [0]
        return [round(i * (n_layers - 1) / (layers - 1)) for i in range(layers)]
    idx = list(layers)
    if not idx or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layers for i in idx):
        raise ConfigError(f"student layers {idx}: give indices in 0..{n_layers - 1} (the teacher has {n_layers})")
    if any(b <= a for a, b in zip(idx, idx[1:])):
        raise ConfigError(f"student layers {idx}: indices must be strictly increasing (each teacher layer once)")
    return idx


def truncated_config(config, layers: int | list[int]):
    """(student config, kept teacher layer indices): the teacher's config with fewer decoder layers."""
    idx = choose_layers(config.num_hidden_layers, layers)
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = len(idx)
    for key in PER_LAYER_CONFIG:
        value = getattr(cfg, key, None)
        if isinstance(value, (list, tuple)) and len(value) == config.num_hidden_layers:
            setattr(cfg, key, [value[i] for i in idx])
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    return cfg, idx


def _layer_list_name(model) -> str:
    """The state-dict prefix of the decoder's layer list (e.g. `model.layers`)."""
    dec = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = getattr(dec, "layers", None)
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise ConfigError(f"{type(model).__name__}: cannot find the decoder's layer list to truncate")


def truncated_copy(teacher_model, layers: int | list[int], dtype: str | torch.dtype | None = None):
    """A new model of the teacher's class with only the chosen decoder layers, weights copied (not shared)."""
    teacher = unwrap_peft(teacher_model)
    cfg, idx = truncated_config(teacher.config, layers)
    param = next(teacher.parameters())
    dtype = to_dtype(dtype) if dtype is not None else param.dtype
    from transformers.initialization import no_init_weights

    with torch.device(param.device), no_init_weights():  # every weight is copied below: skip the random init
        student = type(teacher)._from_config(cfg, dtype=dtype)  # layers built with layer_idx 0..len(idx)-1
    prefix = _layer_list_name(teacher)
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    src = teacher.state_dict()
    student.tie_weights()  # no_init_weights skips it; tied heads (SmolLM2) must stay one tensor
    with torch.no_grad():
        for key, value in student.state_dict().items():
            m = pattern.match(key)
            t_key = f"{prefix}.{idx[int(m.group(1))]}.{key[m.end():]}" if m else key
            if t_key not in src or src[t_key].shape != value.shape:
                raise ConfigError(f"truncated_copy: no teacher tensor of shape {tuple(value.shape)} for {key}")
            value.copy_(src[t_key])
        for j, layer in enumerate(getattr(student.get_decoder(), "layers")):
            for module in layer.modules():  # the KV cache is indexed by layer_idx: it must be 0..N-1
                if hasattr(module, "layer_idx"):
                    module.layer_idx = j
    student.generation_config = copy.deepcopy(teacher.generation_config)
    student.config.kdkit_teacher_layers = idx
    return student.train(teacher.training)


def apply_lora(model, cfg: LoRAConfig):
    """Wrap `model` with peft LoRA adapters; only the adapters stay trainable."""
    from peft import LoraConfig, get_peft_model

    lc = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
                    task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lc)
    except ValueError as e:
        raise ConfigError(f"llm.lora: {e}") from e


def merge_lora(model):
    """A plain transformers model: LoRA deltas merged into the weights (in place); other models unchanged."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def scratch_config(config, overrides: dict):
    """The teacher's config with `overrides` (e.g. {num_hidden_layers: 4, hidden_size: 256}) for a fresh model."""
    data = config.to_dict()
    data.pop("quantization_config", None)
    unknown = [k for k in overrides if k not in data]
    if unknown:
        raise ConfigError(f"student.options for scratch: {unknown} are not fields of the teacher's "
                          f"{type(config).__name__}; fields: {', '.join(sorted(data))}")
    _keeps_architecture(overrides)
    if "num_hidden_layers" in overrides and "layer_types" not in overrides:
        for key in PER_LAYER_CONFIG:
            data.pop(key, None)  # regenerated for the new depth
    data.update(overrides)
    return type(config).from_dict(data)


def _keeps_architecture(overrides: dict) -> None:
    if "model_type" in overrides:
        raise ConfigError("student.options.model_type: a scratch student built from a teacher keeps its "
                          "architecture; omit teacher.model and give options {tokenizer, config} instead")


def _choices() -> str:
    return ", ".join([*STUDENT_KINDS, *LM_ALIASES, "hf:<hub id>", "a model folder"])


def check_student(model_cfg: ModelConfig, teacher_named: bool, llm_cfg: LLMConfig) -> None:
    """The rules of `student.model` / `student.options` that need no model (checked before any work): a student
    cut from or built on the teacher needs `teacher.model`; each kind takes only its own options."""
    name, opts = model_cfg.model, dict(model_cfg.options or {})
    if name == "truncated-teacher":
        if not teacher_named:
            raise ConfigError(f"student.model={name} is built from the teacher: set teacher.model")
        extra = set(opts) - {"layers"}
        if extra:
            raise ConfigError(f"student.options {sorted(extra)} unknown for truncated-teacher; allowed: layers")
        layers = opts.get("layers", 1)
        if isinstance(layers, bool) or not (isinstance(layers, int) and layers >= 1 or isinstance(layers, list)
                                            and layers and all(isinstance(i, int) and i >= 0 for i in layers)):
            raise bad_value("student.options.layers", layers, "a number of layers >= 1 or a list of layer indices")
    elif name == "scratch":
        own = "tokenizer" in opts
        if llm_cfg.lora is not None:
            raise ConfigError("llm.lora on a randomly initialised student trains almost nothing; drop llm.lora")
        if own or not teacher_named:
            if not own or not isinstance(opts.get("config"), dict):
                raise ConfigError("student.model=scratch with its own tokenizer (or without a teacher) takes "
                                  "student.options={tokenizer: NAME-or-folder, config: {model_type: llama, ...}}")
            where = Path(str(opts["tokenizer"])).expanduser()
            if not where.is_dir():
                check_lm_name(opts["tokenizer"], "student.options.tokenizer")
        else:
            _keeps_architecture(opts["config"] if isinstance(opts.get("config"), dict) and len(opts) == 1 else opts)
    else:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"student.model is empty; choose one of: {_choices()}")
        if opts:
            raise ConfigError(f"student.options {sorted(opts)}: a pretrained student ({name}) takes no options")
        if not name.startswith("hf:") and name not in LM_ALIASES and not Path(name).expanduser().is_dir():
            raise bad_value("student.model", name, f"one of {_choices()}")
        check_lm_name(name, "student.model")


def build_student(model_cfg: ModelConfig, teacher_model, llm_cfg: LLMConfig, dtype: str | torch.dtype = "float32"):
    """The student a recipe asks for (`student.model` + `student.options`), with LoRA when `llm.lora` is set."""
    from transformers import AutoModelForCausalLM

    check_student(model_cfg, teacher_model is not None, llm_cfg)
    name, opts = model_cfg.model, dict(model_cfg.options or {})
    dtype = to_dtype(dtype)
    if name == "truncated-teacher":
        n = unwrap_peft(teacher_model).config.num_hidden_layers
        student = truncated_copy(teacher_model, opts.get("layers", max(1, n // 2)), dtype=dtype)
    elif name == "scratch":
        if teacher_model is None or "tokenizer" in opts:
            raise ConfigError("build_student makes a scratch student from the teacher's config (its tokenizer "
                              "too); a student with its own tokenizer is built by kdkit.llm.build")
        overrides = opts["config"] if isinstance(opts.get("config"), dict) and len(opts) == 1 else opts
        cfg = scratch_config(unwrap_peft(teacher_model).config, overrides)
        student = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    else:
        student, _ = load_causal_lm(name, dtype=dtype)
    if llm_cfg.lora is not None:
        student = apply_lora(student, llm_cfg.lora)
    return student
