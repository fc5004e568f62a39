"""Options, for every verb: a YAML recipe + `key=value` overrides, validated into typed dataclasses before any work.

One parser (`parse_overrides`, YAML values), one merge (`merge`: an empty mapping clears, `a.1.b=` edits a list
element), one validator (`build` / `coerce`). Each option declares its type and valid range once, beside it:

    epochs: PositiveInt = 240                       # Annotated[int, Range(ge=1)]
    lr: Annotated[float, Range(gt=0)] = 0.05        # NaN and infinities are refused for every float
    name: RunName | None = None                     # one path component: a run cannot leave output_dir

Cross-field rules live in a dataclass's `validate(self, at)` (`at` is its key prefix, e.g. "optim."), which
`build` calls once the fields are checked. A method factory's typed keyword-only arguments are options too
(`factory_options` / `build_options`). Recipes of every pillar live in `recipes/`; a recipe says its pillar
(`pillar: condense`), and each verb builds its own schema with `load_recipe(name, overrides, schema=...)`.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from .budget import pop_budget
from .errors import ConfigError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


# ---------------------------------------------------------------- a type, and its range beside it


@dataclass(frozen=True)
class Range:
    """The allowed interval of a number: `Annotated[float, Range(gt=0)]`. NaN and infinities are refused for every
    float (`finite=False` allows infinities where they mean something)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    finite: bool = True

    def ok(self, v) -> bool:
        if isinstance(v, float) and (math.isnan(v) or (self.finite and math.isinf(v))):
            return False
        return not ((self.ge is not None and not v >= self.ge) or (self.gt is not None and not v > self.gt)
                    or (self.le is not None and not v <= self.le) or (self.lt is not None and not v < self.lt))

    def describe(self) -> str:
        lo = f">= {self.ge:g}" if self.ge is not None else f"> {self.gt:g}" if self.gt is not None else ""
        hi = f"<= {self.le:g}" if self.le is not None else f"< {self.lt:g}" if self.lt is not None else ""
        return " and ".join(p for p in (lo, hi) if p)


@dataclass(frozen=True)
class Name:
    """A run or folder name: one path component, so a run folder cannot leave `output_dir`."""

    def ok(self, v) -> bool:
        return bool(v) and v not in (".", "..") and not any(c in v for c in "/\\\x00")

    def describe(self) -> str:
        return "a plain folder name (no '/', not '.' or '..')"


@dataclass(frozen=True)
class Exists:
    """A path that must exist (file or folder), checked before any work."""

    def ok(self, v) -> bool:
        return Path(v).expanduser().exists()

    def describe(self) -> str:
        return "an existing file or folder (nothing is there)"


PositiveInt = Annotated[int, Range(ge=1)]
NonNegInt = Annotated[int, Range(ge=0)]
PositiveFloat = Annotated[float, Range(gt=0)]
NonNegFloat = Annotated[float, Range(ge=0)]
Probability = Annotated[float, Range(ge=0, le=1)]
RunName = Annotated[str, Name()]
ExistingPath = Annotated[str, Exists()]


def show(value) -> str:
    """A value as the user typed it (YAML flow style), cut to one short line."""
    if isinstance(value, str):
        text = repr(value)
    else:
        text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
    return text if len(text) <= 60 else text[:57] + "..."


def bad_value(key: str, value, allowed: str) -> ConfigError:
    """The one shape of a bad-value error: the key, the value given, and what is allowed."""
    return ConfigError(f"{key}={show(value)} is not allowed: expected {allowed}")


# ---------------------------------------------------------------- the classifier / LM / CoT recipe (`kdkit distill|train`)


@dataclass
class DataConfig:
    name: str = "cifar10"
    batch_size: PositiveInt = 64
    eval_batch_size: PositiveInt = 256
    train_per_class: PositiveInt | None = None  # balanced subset of the train split (None = all)
    test_limit: PositiveInt | None = None  # evaluate on a fixed class-balanced subset of N test images (None = all)
    augment: bool = True  # random crop (padding 4) + horizontal flip


@dataclass
class ModelConfig:
    model: str = "resnet8x4"  # a zoo name (`kdkit recipes --models`) or `timm:<name>`
    checkpoint: ExistingPath | None = None  # safetensors weights (a run folder's model.safetensors)
    options: dict[str, Any] = field(default_factory=dict)  # extra keyword options for the model factory


@dataclass
class TeacherConfig(ModelConfig):
    model: str | None = None
    cache: ExistingPath | None = None  # stored logits (safetensors) instead of a live teacher
    # An OpenAI-compatible vLLM server of the teacher (`kdkit serve-teacher MODEL`): its top-k prompt log-probs
    # replace the live teacher's logits (LM KD, teacher-signal stores) and it writes CoT rationales
    # (cot.backend=server); teacher.model still names the teacher, for its tokenizer.
    server: str | None = None
    server_model: str | None = None  # the id the server serves the teacher under (default: its only model)
    server_k: PositiveInt = 20  # top-k log-probs per position; at most the server's --max-logprobs
    server_timeout: PositiveFloat = 120.0  # seconds per request
    server_concurrency: PositiveInt = 4  # requests in flight
    server_retries: NonNegInt = 3  # retries of a failed request (connection error, timeout, 429, 5xx)


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: PositiveFloat = 0.05
    momentum: Annotated[float, Range(ge=0, lt=1)] = 0.9
    weight_decay: NonNegFloat = 5e-4
    nesterov: bool = False
    betas: list[Annotated[float, Range(ge=0, lt=1)]] = field(default_factory=lambda: [0.9, 0.999])

    def validate(self, at: str) -> None:
        if len(self.betas) != 2:
            raise bad_value(f"{at}betas", self.betas, "two numbers in [0, 1), e.g. [0.9, 0.999]")
        if self.nesterov and self.name == "sgd" and self.momentum == 0:
            raise ConfigError(f"{at}nesterov=true needs {at}momentum > 0 (Nesterov momentum with no momentum is "
                              f"refused by torch.optim.SGD); set {at}momentum=0.9 or {at}nesterov=false")


@dataclass
class SchedulerConfig:
    name: Literal["step", "cosine", "linear", "constant"] = "step"
    milestones: list[NonNegInt] = field(default_factory=lambda: [150, 180, 210])  # epochs (step schedule)
    gamma: PositiveFloat = 0.1
    warmup_epochs: NonNegFloat = 0.0  # linear warm-up from 0
    min_lr: NonNegFloat = 0.0  # cosine and linear floor


@dataclass
class TrainerConfig:
    epochs: PositiveInt = 240
    grad_accum: PositiveInt = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: NonNegInt = 0
    eval_every: PositiveInt = 1  # epochs
    save_every_steps: NonNegInt = 0  # extra mid-epoch checkpoints (0 = only at epoch ends)
    keep_checkpoints: PositiveInt = 2
    log_every: PositiveInt = 20  # steps between scalar logs
    compile: bool = False  # torch.compile the student step (and the teacher's forward)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = None
    data_on_device: bool = True  # keep the uint8 image tensors on the GPU (150 MB for CIFAR-10): no per-batch copy
    channels_last: bool = False
    cpu: bool = False  # force CPU even when a GPU is present
    progress: bool = True
    threads: PositiveInt | None = None  # torch intra-op threads (None = torch's default)


@dataclass
class LoRAConfig:
    r: PositiveInt = 16
    alpha: PositiveInt = 32
    dropout: Annotated[float, Range(ge=0, lt=1)] = 0.05
    target_modules: list[str] | str = "all-linear"  # peft's names, or "all-linear"


@dataclass
class OnPolicyConfig:
    """GKD-style mixed distillation (Agarwal et al. 2024): a share of batches uses student-generated text."""

    fraction: Probability = 0.0  # GKD's lambda: probability that a batch's continuations are generated by the student
    prompt_tokens: PositiveInt = 64  # the first N tokens of a block are the prompt; the student writes the rest
    max_new_tokens: PositiveInt = 64
    temperature: PositiveFloat = 1.0
    top_p: Annotated[float, Range(gt=0, le=1)] = 1.0
    backend: Literal["kdkit", "trl"] = "kdkit"  # kdkit's loop, or TRL's DistillationTrainer (jsd family, T=1)
    vllm: bool = False  # backend trl: the student's continuations generated by a colocated vLLM engine (CUDA)

    def validate(self, at: str) -> None:
        if self.vllm and self.backend != "trl":
            raise ConfigError(f"{at}vllm=true generates through TRL's DistillationTrainer: set {at}backend=trl "
                              "(kdkit's own loop generates with transformers)")
        if self.vllm and self.fraction == 0:
            raise ConfigError(f"{at}vllm=true generates the student's continuations, and {at}fraction=0 asks for "
                              "none: set a fraction > 0 or vllm=false")


@dataclass
class MultiTeacherLMConfig:
    """Several LM teachers (`teachers:`, local or served): how each token's teacher signal is made. A local teacher
    with another tokenizer than the student's trains through the recipe's cross_tokenizer loss (`mean`/`fixed`: its
    weight scales its term; `route`: its texts; not `learned`), see `kdkit.llm.cross_teachers`.

    `mix`: ``mean`` / ``fixed`` / ``learned`` mix the teachers' distributions, log sum_k w_k p_k at each loss's T
    (MEAL V2's averaged targets; ``fixed`` takes `weights`, ``learned`` trains softmax weights with the student through
    the mixture target); ``route`` gives each training text one teacher, by its `route_by` column: the column's values
    are `route_values` (one per teacher, in order) or, without them, teacher indices 0..K-1."""

    mix: Literal["mean", "fixed", "learned", "route"] = "mean"
    weights: list[NonNegFloat] = field(default_factory=list)  # fixed: one per teacher (normalised)
    route_by: str | None = None  # route: the dataset column naming each text's teacher
    route_values: list[str] = field(default_factory=list)  # route: the column value of each teacher, in order

    def validate(self, at: str) -> None:
        if (self.mix == "fixed") != bool(self.weights):
            raise ConfigError(f"{at}weights is the fixed mixture's (one number per teacher): set it with "
                              f"{at}mix=fixed, and only then (got mix={self.mix}, weights={self.weights})")
        if self.weights and not sum(self.weights) > 0:
            raise ConfigError(f"{at}weights={self.weights} must have a positive sum")
        if (self.mix == "route") != bool(self.route_by):
            raise ConfigError(f"{at}route_by (the column naming each text's teacher) goes with {at}mix=route, and "
                              f"mix=route needs it (got mix={self.mix}, route_by={self.route_by})")
        if self.route_values and self.mix != "route":
            raise ConfigError(f"{at}route_values is only used with {at}mix=route")
        if len(set(self.route_values)) != len(self.route_values):
            raise ConfigError(f"{at}route_values={self.route_values} repeats a value; each teacher needs its own")


@dataclass
class LLMConfig:
    """Causal-LM distillation settings (`kdkit distill recipe=smollm2-kd`); unused by the classifier pillar."""

    block_size: Annotated[int, Range(ge=2)] = 256  # tokens per training sequence (texts joined with EOS and cut)
    text_field: str | None = None  # column holding the text (default: the dataset's own, e.g. GSM8K q + a)
    train_examples: PositiveInt | None = None  # use the first N training texts (None = all)
    eval_examples: PositiveInt | None = None  # perplexity on the first N test texts (None = all)
    max_steps: PositiveInt | None = None  # stop after N optimiser steps (None = trainer.epochs over the data)
    eval_every_steps: NonNegInt = 0  # extra perplexity evaluations (0 = at the end of each epoch)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights of teacher and student
    fused: bool = False  # token KD through the fused chunked linear-KD kernel (no tokens x vocab logits)
    chunk_size: PositiveInt | None = None  # tokens per chunk of the fused kernel (None: its auto_chunk_size)
    lora: LoRAConfig | None = None  # train LoRA adapters (peft) instead of every weight
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    multi_teacher: MultiTeacherLMConfig = field(default_factory=MultiTeacherLMConfig)  # with `teachers:` (2 or more)
    gradient_checkpointing: bool = False

    def validate(self, at: str) -> None:
        if self.on_policy.fraction > 0 and self.on_policy.prompt_tokens >= self.block_size:
            raise ConfigError(f"{at}on_policy.prompt_tokens={self.on_policy.prompt_tokens} must be below "
                              f"{at}block_size={self.block_size} (the student writes the rest of each block)")


@dataclass
class CoTConfig:
    """Chain-of-thought / rationale distillation (`kdkit distill recipe=cot-math`, task: cot): generate, filter,
    SFT, learn from negatives (REDI), evaluate. Models: teacher.model, student.model (+ options, llm.lora)."""

    backend: Literal["transformers", "vllm", "server"] = "transformers"  # teacher generation (server: teacher.server)
    fallback_to_transformers: bool = False  # vllm asked for but not importable: use transformers (with a warning)
    samples: PositiveInt = 4  # rationales sampled per training question (N)
    temperature: NonNegFloat = 0.7
    top_p: Annotated[float, Range(gt=0, le=1)] = 0.95
    max_new_tokens: PositiveInt = 256
    train_questions: PositiveInt | None = None  # the first N GSM8K train questions (None = all 7,473)
    test_questions: PositiveInt | None = None  # accuracy on the first N test questions (None = all 1,319)
    shard_size: PositiveInt = 32  # questions per generation shard: the unit an interrupted stage resumes from
    generations: ExistingPath | None = None  # reuse stage 1 of another run (its RUN/generate folder): same questions
    instruction: str = "Solve the problem step by step. End with a line 'The answer is N.'"
    # reference: the dataset's own rationales, no teacher (`kdkit train`: how a task's teacher is fine-tuned)
    sft: Literal["rationale", "answer_only", "step_by_step", "reference"] = "rationale"
    rationale_weight: NonNegFloat = 1.0  # step_by_step: loss = label task + rationale_weight * rationale task
    short_ratio: Probability = 0.0  # mix distillation: this fraction of examples use the short (dataset) rationale
    sft_epochs: PositiveFloat = 1.0
    kd_weight: NonNegFloat = 0.0  # > 0: token-level logit KD from the teacher on completion tokens (same tokenizer)
    kd_divergence: str = "fkl"  # a token_kd divergence (checked against the loss's own choices)
    kd_topk: NonNegInt = 0  # > 0: KD from the teacher's top-k per sequence, computed once and reused by every epoch
    max_length: Annotated[int, Range(ge=2)] = 512  # prompt + completion tokens in SFT
    redi: bool = True  # stage 4 after SFT (needs incorrect rationales)
    redi_alpha: Probability = 0.8  # weight of the negative term (REDI's alpha)
    redi_epochs: PositiveFloat = 1.0
    redi_lr: PositiveFloat | None = None  # default: optim.lr / 50 (the REDI authors' 5e-5 SFT -> 1e-6 REDI)
    redi_reference_positives: bool = False  # no correct teacher trace for a question: pair with the dataset's own
    eval_max_new_tokens: PositiveInt = 256
    answer_check: str = "numeric"  # numeric | exact | module:function (f(completion, gold) -> bool)
    eval_splits: list[str] = field(default_factory=lambda: ["test"])  # e.g. [test, hard] (chain_sum's longer chains)
    eval_teacher: bool = True
    eval_student_before: bool = True  # the untrained student's accuracy (same for every run of one student)
    examples_in_report: NonNegInt = 5


@dataclass
class Recipe:
    """`kdkit distill|train`: classifier KD and teacher training, causal-LM KD (`llm:`), rationale distillation
    (`cot:`)."""

    description: str = ""
    # image classifiers, causal language models (`llm:` section), or rationale distillation (`cot:` section)
    task: Literal["classify", "lm", "cot"] = "classify"
    data: DataConfig = field(default_factory=DataConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # several frozen teachers (multi-teacher losses get one `Outputs` per teacher, in this order)
    teachers: list[TeacherConfig] = field(default_factory=list)
    # a second network trained jointly with the student (online distillation: DML, BD-KD); no teacher then
    peer: ModelConfig | None = None
    ce_weight: NonNegFloat = 1.0  # weight of cross-entropy on hard labels
    label_smoothing: Annotated[float, Range(ge=0, lt=1)] = 0.0  # of that cross-entropy (classifiers only)
    # name -> {type: registry name (defaults to the key), weight: float, <loss options>}
    losses: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    cot: CoTConfig = field(default_factory=CoTConfig)
    output_dir: str = "runs"
    name: RunName | None = None  # run folder name (default: recipe name + time)
    resume: str | None = None  # a run folder or checkpoint folder, or "auto" = latest in the run folder

    PILLAR: typing.ClassVar[str] = "distill"
    # settings a resumed run may change (evaluation, logging, housekeeping); any other difference is refused
    RESUME_MAY_CHANGE: typing.ClassVar[tuple[str, ...]] = (
        "description", "resume", "output_dir", "trainer.progress", "trainer.log_every", "trainer.keep_checkpoints",
        "trainer.save_every_steps", "trainer.threads", "trainer.eval_every", "data.eval_batch_size",
        "data.test_limit", "trainer.compile", "trainer.compile_mode", "llm.eval_every_steps", "llm.eval_examples",
        "cot.eval_max_new_tokens", "cot.eval_teacher", "cot.eval_student_before", "cot.examples_in_report",
        "cot.test_questions", "cot.shard_size", "name")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, at: str) -> None:
        check_resume(self.resume, f"{at}resume")
        validate_losses(self.losses)
        if self.label_smoothing and self.task != "classify":
            raise ConfigError(f"{at}label_smoothing is the classifier cross-entropy's; task={self.task} has none")


def check_resume(resume: str | None, key: str) -> None:
    """`resume` is `auto` (the run folder's latest checkpoint, or a fresh start) or an existing folder."""
    if resume is not None and resume != "auto" and not Path(resume).expanduser().exists():
        raise bad_value(key, resume, "auto or an existing run or checkpoint folder (nothing is there)")


# ---------------------------------------------------------------- recipe files


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


def list_recipes(pillar: str | None = None) -> list[str]:
    names = sorted({p.stem for d in _recipe_dirs() if d.is_dir() for p in d.glob("*.yaml")})
    return names if pillar is None else [n for n in names if recipe_pillar(n) == pillar]


def recipe_description(name: str) -> str:
    """First line of a recipe's `description` (for `kdkit recipes`)."""
    text = str(_raw_recipe(name).get("description", "")).strip()
    return text.splitlines()[0] if text else ""


def recipe_budget(name: str):
    """The recipe's `budget`, `cpu_recipe` and `cpu_minutes` (kdkit/budget.py), checked."""
    return pop_budget(_raw_recipe(name), name, _own_keys)


def recipe_pillar(name: str) -> str:
    """The verb a recipe is for: `distill` (classifier, LM and CoT recipes; the default), `condense`, `diffusion`."""
    return str(_raw_recipe(name).get("pillar", "distill"))


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"recipe {path} cannot be read: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of keys to values, got {type(data).__name__}")
    return data


def _own_keys(name: str) -> dict:
    """A recipe file's own keys, without its `base:` chain."""
    return _read_yaml(recipe_path(name))


def _raw_recipe(name: str, seen: tuple = ()) -> dict:
    """The recipe's YAML with its `base:` chain merged underneath it."""
    path = recipe_path(name)
    if path in seen:
        raise ConfigError(f"recipe base chain loops: {' -> '.join(map(str, seen + (path,)))}")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    return merge(_raw_recipe(base, seen + (path,)), data)


def merge(a: dict, b: dict) -> dict:
    """`b` over `a`, nested; an empty mapping clears (`losses={}`), `{"1": {...}}` over a list edits element 1."""
    out = dict(a)
    for k, v in b.items():
        if v == {}:
            out[k] = {}
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
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
        out[i] = merge(out[i], v) if isinstance(v, dict) and isinstance(out[i], dict) else v
    return out


def split_recipe(settings: list[str]) -> tuple[str | None, list[str]]:
    """`recipe=NAME` (the last one given) apart from the other `key=value` settings of a command line."""
    recipe, rest = None, []
    for item in settings:
        if item.startswith("recipe="):
            recipe = item.partition("=")[2]
        else:
            rest.append(item)
    return recipe, rest


def parse_overrides(items: list[str]) -> dict:
    """`a.b=1 c=x` -> nested dict; values are parsed as YAML (`x=[1,2]`, `y=null`, `z=1e-3`, `t=no`)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (e.g. trainer.epochs=10)")
        key, _, text = item.partition("=")
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: cannot parse value {text!r} ({str(e).splitlines()[0]})") from e
        node = out
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override key '{key}' has an empty part (write a.b=1)")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override of '{p}'")
        node[parts[-1]] = value
    return out


def apply_overrides(raw: dict, overrides: list[str] | dict | None) -> dict:
    """Overrides applied in order over `raw` (`losses={} losses.ct.type=cross_tokenizer` clears, then adds)."""
    if isinstance(overrides, list):
        parse_overrides(overrides)  # conflicting overrides fail as a whole
        for item in overrides:
            raw = merge(raw, parse_overrides([item]))
        return raw
    return merge(raw, overrides or {})


def load_recipe(name: str | None = None, overrides: list[str] | dict | None = None, schema: type = Recipe):
    """Read a named recipe (or none: the schema's defaults), apply overrides, validate everything."""
    raw = _raw_recipe(name) if name else {}
    pillar = raw.pop("pillar", "distill")
    want = getattr(schema, "PILLAR", "distill")
    if name and pillar != want:
        raise ConfigError(f"recipe '{name}' is a `kdkit {pillar}` recipe, not a `kdkit {want}` one "
                          f"(`kdkit recipes` lists each recipe with its verb)")
    budget = pop_budget(raw, name, _own_keys)
    raw = apply_overrides(raw, overrides)
    if "name" not in raw and name and "name" in {f.name for f in dataclasses.fields(schema)}:
        raw["name"] = None
    config = build(schema, raw, "")
    config.budget = budget  # beside the settings, not one of them (kdkit/budget.py): read by `fit`'s estimate
    return config


# ---------------------------------------------------------------- typed building


def hints_of(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def build(cls, data: dict, prefix: str):
    """Turn a dict into dataclass `cls`, failing on unknown keys, wrong types and out-of-range values with the key's
    full name; then the dataclass's own cross-field `validate(prefix)`."""
    if not isinstance(data, dict):
        raise bad_value(prefix.rstrip(".") or "recipe", data, "a mapping of keys to values")
    hints = hints_of(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown key '{prefix}{key}'.{hint} Allowed keys here: {', '.join(names)}")
        kwargs[key] = coerce(value, hints[key], f"{prefix}{key}")
    obj = cls(**kwargs)
    for f in dataclasses.fields(cls):  # defaults are typed values too: nested defaults get their own checks
        if f.name not in kwargs and dataclasses.is_dataclass(getattr(obj, f.name)):
            _validate_tree(getattr(obj, f.name), f"{prefix}{f.name}.")
    if hasattr(obj, "validate"):
        obj.validate(prefix)
    return obj


def _validate_tree(obj, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            _validate_tree(v, f"{prefix}{f.name}.")
    if hasattr(obj, "validate"):
        obj.validate(prefix)


def describe_type(tp) -> str:
    """What a type allows, in words (for error messages)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        base = describe_type(args[0])
        marks = [m for m in args[1:] if hasattr(m, "describe")]
        if marks and not isinstance(marks[0], Range):  # a name or a path says all of itself
            return marks[0].describe()
        return f"{base} {' and '.join(m.describe() for m in marks if m.describe())}".strip()
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else describe_type(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(show, args))
    if origin is list:
        return f"a list of ({describe_type(args[0])})" if args else "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping of " + ", ".join(f.name for f in dataclasses.fields(tp))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def coerce(value, tp, key: str):
    """Check `value` against type `tp` (with the few safe conversions YAML needs) and return it."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Annotated:
        if typing.get_origin(args[0]) in (list, dict) or dataclasses.is_dataclass(args[0]):
            out = coerce(value, args[0], key)
        else:
            try:
                out = coerce(value, args[0], key)
            except ConfigError:
                raise bad_value(key, value, describe_type(tp)) from None
        for check in args[1:]:
            if hasattr(check, "ok") and out is not None and not check.ok(out):
                raise bad_value(key, value, describe_type(tp))
        return out
    if dataclasses.is_dataclass(tp):
        return build(tp, value if value is not None else {}, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        for a in members:  # a value of the right base type gets that member's own message (its range)
            if _base_matches(value, a):
                return coerce(value, a, key)
        for a in members:
            try:
                return coerce(value, a, key)
            except ConfigError:
                continue
        raise bad_value(key, value, describe_type(tp))
    if origin is Literal:
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args if a == value):
            raise bad_value(key, value, describe_type(tp))
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad_value(key, value, describe_type(tp))
        return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise bad_value(key, value, "a mapping, e.g. {width: 64}")
        return {k: coerce(v, args[1], f"{key}.{k}") for k, v in value.items()} if args else dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad_value(key, value, "true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad_value(key, value, "an integer")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)  # YAML reads 1e-3 as a string
            except ValueError:
                pass
        if number is None:
            raise bad_value(key, value, "a number")
        if math.isnan(number):
            raise bad_value(key, value, "a number, not NaN")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # name=2024
        raise bad_value(key, value, "a string")
    if tp is type(None):
        if value is None:
            return None
        raise bad_value(key, value, "null")
    raise ConfigError(f"{key}: unsupported option type {tp}")


def _base_matches(value, tp) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return _base_matches(value, args[0])
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, (list, tuple))
    if origin is dict or dataclasses.is_dataclass(tp):
        return isinstance(value, dict)
    return False


def float_checked(value: float, key: str) -> None:
    """Every float must be a number (used by code that reads floats outside a dataclass)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise bad_value(key, value, "a finite number")


# ---------------------------------------------------------------- factories: typed keyword-only options


def factory_options(factory) -> dict[str, tuple[Any, Any]]:
    """The typed keyword options of a factory or class: {name: (type, default)} (`inspect.Parameter.empty` when
    required). Positional parameters are what the caller supplies (the run's context), not options."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    hints = typing.get_type_hints(target, include_extras=True)
    sig = inspect.signature(factory)
    return {n: (hints.get(n, Any), p.default) for n, p in sig.parameters.items()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n not in ("self", "ctx")}


def build_options(factory, raw: dict, prefix: str, what: str) -> dict:
    """Validate `raw` against `factory`'s typed keyword options: unknown names fail listing the allowed ones, and
    each value is coerced (type and range) under `prefix`."""
    if not isinstance(raw, dict):
        raise bad_value(prefix.rstrip("."), raw, "a mapping of options")
    params = factory_options(factory)
    out = {}
    for key, value in raw.items():
        if key not in params:
            close = difflib.get_close_matches(str(key), params, n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown option '{prefix}{key}' for {what}.{hint} "
                              f"Allowed: {', '.join(params) or '(none)'}")
        out[key] = coerce(value, params[key][0], f"{prefix}{key}")
    return out


def complete_options(factory, given: dict, prefix: str, what: str) -> dict:
    """`given` options checked (`build_options`) with the factory's defaults filled in, as plain data: what a run's
    config.yaml shows and what a resumed run must match. A required option left out is refused."""
    checked = build_options(factory, given if given is not None else {}, prefix, what)
    out = {}
    for name, (tp, default) in factory_options(factory).items():
        if name not in checked and default is inspect.Parameter.empty:
            raise ConfigError(f"{what} needs {prefix}{name}=... ({describe_type(tp)})")
        out[name] = to_plain(checked.get(name, default))
    return out


def loss_params(factory) -> dict[str, Any]:
    """The typed keyword options a loss constructor accepts."""
    return {n: tp for n, (tp, _) in factory_options(factory).items()}


def validate_losses(losses: dict) -> None:
    """Each loss entry names a registered loss and only options its constructor accepts, of the right types and
    ranges (entries are updated in place with the coerced values)."""
    from .registry import LOSSES

    for name, entry in losses.items():
        key = f"losses.{name}"
        if entry is None:
            continue
        if not isinstance(entry, dict):
            raise bad_value(key, entry, "a mapping like {weight: 1.0, T: 4}, or null to drop the loss")
        kind = entry.get("type", name)
        if kind not in LOSSES:
            close = difflib.get_close_matches(str(kind), LOSSES.names(), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"{key}: unknown loss '{kind}'.{hint} Choices: {', '.join(LOSSES.names())}")
        entry["weight"] = coerce(entry.get("weight", 1.0), NonNegFloat, f"{key}.weight")
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


def to_plain(obj):
    """A config (dataclasses, tuples) as plain YAML-able data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def dump(recipe, path: Path) -> None:
    """The resolved config as YAML, written atomically."""
    from .checkpoint import atomic_path

    with atomic_path(Path(path)) as tmp:
        tmp.write_text(yaml.safe_dump(to_plain(recipe), sort_keys=False))
