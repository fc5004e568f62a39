"""`kdkit check`: can this teacher be distilled into this student, here, before any weight is loaded?

Reads configs and tokenizers only (the models are built on the meta device), so it answers in seconds even for
models that would not fit: tokenizer compatibility (the condition for token-level logit KD), vocab sizes,
special tokens, dtype/device support, parameter counts and a training-memory estimate with its formula.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch

from ..config import (LoRAConfig, PositiveInt, apply_overrides, build, load_recipe, parse_overrides, split_recipe,
                      to_plain)
from ..errors import ConfigError
from .models import load_tokenizer, resolve_lm, to_dtype
from .tokenizers import tokenizer_differences

GiB = 1024 ** 3
SPECIAL = ("bos", "eos", "pad", "unk")
ACT_FORMULA = "B*L*layers*(8*hidden + 5*intermediate)*e"


@dataclass
class ModelInfo:
    """What the check needs to know about one side, from its config and tokenizer."""

    name: str
    params: int
    layers: int
    hidden: int
    intermediate: int
    head_rows: int
    tokenizer_size: int
    special: dict[str, tuple[str | None, int | None]]
    lora_params: int = 0


@dataclass
class MemoryEstimate:
    """Training memory in bytes, item by item, each with the formula that produced it."""

    items: list[tuple[str, str, int]]  # (what, formula, bytes), shared by both totals
    logits_plain: tuple[str, int]
    logits_fused: tuple[str, int]

    @property
    def base(self) -> int:
        return sum(b for _, _, b in self.items)

    @property
    def total_plain(self) -> int:
        return self.base + self.logits_plain[1]

    @property
    def total_fused(self) -> int:
        return self.base + self.logits_fused[1]


@dataclass
class CheckReport:
    teacher: ModelInfo
    student: ModelInfo
    compatible: bool
    reasons: list[str]  # why token-level logit KD is refused (empty when compatible)
    verdict: str
    device: str
    dtype: str
    cuda: bool
    bf16: str
    device_memory: int | None
    memory: MemoryEstimate
    notes: list[str] = field(default_factory=list)


def dtype_bytes(dtype: str | torch.dtype) -> int:
    return torch.empty((), dtype=to_dtype(dtype)).element_size()


def estimate_memory(*, student_params: int, teacher_params: int, lora_params: int, layers: int, hidden: int,
                    intermediate: int, teacher_hidden: int, student_vocab: int, teacher_vocab: int,
                    batch_size: int, seq_len: int, dtype: str | torch.dtype, chunk_size: int) -> MemoryEstimate:
    """Bytes for one training step of the student beside a frozen teacher, weights in `dtype` (e bytes each).

    Full training keeps weights, grads and AdamW's two moments in the weights' dtype: 4e bytes/param (16 for
    fp32). LoRA keeps the base frozen (e/param) and trains fp32 adapters (16 bytes/param: peft upcasts them).
    Activations are a rough per-layer count for a Llama-style block with SDPA attention (no stored score matrix).
    Logits: fp32 [tokens, vocab] for both models, or one chunk of them with the fused kernel (which keeps the
    teacher's hidden states instead).
    """
    e = dtype_bytes(dtype)
    tokens = batch_size * seq_len
    if lora_params:
        items = [("student weights (frozen base)", f"P_s*e = {student_params:,}*{e}", student_params * e),
                 ("LoRA adapters + grads + AdamW", f"P_lora*16 = {lora_params:,}*16", lora_params * 16)]
    else:
        items = [("student weights", f"P_s*e = {student_params:,}*{e}", student_params * e),
                 ("student grads", f"P_s*e = {student_params:,}*{e}", student_params * e),
                 ("AdamW moments", f"2*P_s*e = 2*{student_params:,}*{e}", 2 * student_params * e)]
    items.append(("teacher weights (inference)", f"P_t*e = {teacher_params:,}*{e}", teacher_params * e))
    items.append(("student activations (rough)",
                  f"{ACT_FORMULA} = {batch_size}*{seq_len}*{layers}*(8*{hidden}+5*{intermediate})*{e}",
                  tokens * layers * (8 * hidden + 5 * intermediate) * e))
    plain = (f"B*L*(V_s+V_t)*4 = {tokens:,}*({student_vocab:,}+{teacher_vocab:,})*4",
             tokens * (student_vocab + teacher_vocab) * 4)
    rows = min(chunk_size, tokens)
    fused = (f"min(C,B*L)*(V_s+V_t)*4 + B*L*hidden_t*e = {rows:,}*({student_vocab:,}+{teacher_vocab:,})*4"
             f" + {tokens:,}*{teacher_hidden}*{e}",
             rows * (student_vocab + teacher_vocab) * 4 + tokens * teacher_hidden * e)
    return MemoryEstimate(items, plain, fused)


def _meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _lora_params(model, lora: LoRAConfig) -> int:
    """Adapter parameters peft would add: r*(in+out) per targeted Linear ("all-linear" skips the LM head)."""
    head = model.get_output_embeddings()
    targets = lora.target_modules
    n = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        if targets == "all-linear" or any(name == t or name.endswith("." + t)
                                           for t in ([targets] if isinstance(targets, str) else targets)):
            n += lora.r * (module.in_features + module.out_features)
    return n


def _info(name: str, config, tokenizer, lora: LoRAConfig | None = None) -> ModelInfo:
    model = _meta_model(config)
    special = {k: (getattr(tokenizer, f"{k}_token", None), getattr(tokenizer, f"{k}_token_id", None))
               for k in SPECIAL}
    return ModelInfo(name=name, params=sum(p.numel() for p in model.parameters()),
                     layers=config.num_hidden_layers, hidden=config.hidden_size,
                     intermediate=getattr(config, "intermediate_size", 4 * config.hidden_size),
                     head_rows=model.get_output_embeddings().weight.shape[0], tokenizer_size=len(tokenizer),
                     special=special, lora_params=_lora_params(model, lora) if lora else 0)


def _student_side(student: str, options: dict, t_config, t_tok):
    """(config, tokenizer, label) of the student, built from the teacher's config where it is cut from it."""
    from transformers import AutoConfig

    from .students import STUDENT_KINDS, scratch_config, truncated_config

    if student == "truncated-teacher":
        extra = set(options) - {"layers"}
        if extra:
            raise ConfigError(f"student.{sorted(extra)[0]}: truncated-teacher takes only student.layers")
        layers = options.get("layers", max(1, t_config.num_hidden_layers // 2))
        cfg, idx = truncated_config(t_config, layers)
        return cfg, t_tok, f"truncated-teacher ({len(idx)} of {t_config.num_hidden_layers} layers)"
    if student == "scratch":
        overrides = options["config"] if isinstance(options.get("config"), dict) else options
        return scratch_config(t_config, overrides), t_tok, "scratch (teacher's config + overrides)"
    if options:
        raise ConfigError(f"student.{sorted(options)[0]}: options apply only to {', '.join(STUDENT_KINDS)}")
    path = resolve_lm(student)
    return AutoConfig.from_pretrained(str(path)), load_tokenizer(student), student


def _device(device: str) -> tuple[str, bool, str, int | None]:
    cuda = torch.cuda.is_available()
    dev = ("cuda" if cuda else "cpu") if device == "auto" else device
    if dev.startswith("cuda"):
        if not cuda:
            raise ConfigError(f"device={device}: CUDA is not available here (torch {torch.__version__}); use cpu")
        bf16 = "yes" if torch.cuda.is_bf16_supported() else "no (use float32 or float16)"
        mem = torch.cuda.get_device_properties(torch.device(dev)).total_memory
    else:
        bf16 = "yes (CPU: correct but slow)"
        try:
            mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            mem = None
    return dev, cuda, bf16, mem


def preflight(teacher: str, student: str = "truncated-teacher", *, student_options: dict | None = None,
              device: str = "auto", dtype: str = "bfloat16", batch_size: int = 8, seq_len: int = 512,
              lora: bool | LoRAConfig = False, chunk_size: int = 1024) -> CheckReport:
    """Compare a teacher and a student for token-level KD and estimate the training memory (nothing is trained)."""
    from transformers import AutoConfig

    to_dtype(dtype)
    if batch_size < 1 or seq_len < 1 or chunk_size < 1:
        raise ConfigError("batch_size, seq_len and chunk_size must be positive")
    lora_cfg = LoRAConfig() if lora is True else (lora or None)
    t_path = resolve_lm(teacher)
    t_config, t_tok = AutoConfig.from_pretrained(str(t_path)), load_tokenizer(teacher)
    s_config, s_tok, s_label = _student_side(student, dict(student_options or {}), t_config, t_tok)
    t_info = _info(str(teacher), t_config, t_tok)
    s_info = _info(s_label, s_config, s_tok, lora_cfg)

    reasons = tokenizer_differences(t_tok, s_tok)
    notes = []
    if not reasons and t_info.head_rows != s_info.head_rows:
        reasons.append(f"lm_head rows differ: teacher {t_info.head_rows:,}, student {s_info.head_rows:,} "
                       "(token KD compares logits over one vocabulary)")
    for side, info in (("teacher", t_info), ("student", s_info)):
        if info.head_rows > info.tokenizer_size:
            notes.append(f"{side} lm_head is padded: {info.head_rows:,} rows for {info.tokenizer_size:,} "
                         "tokenizer tokens (the extra rows are never targets)")
        elif info.head_rows < info.tokenizer_size:
            reasons.append(f"{side} lm_head has {info.head_rows:,} rows but its tokenizer {info.tokenizer_size:,} "
                           "tokens: some token ids have no logit")
    compatible = not reasons
    if compatible:
        verdict = "same tokenizer: token-level logit KD OK (losses token_kd; llm.fused=true for the fused kernel)"
    else:
        verdict = ("plain logit KD refused: " + "; ".join(reasons) + ". Use losses.cross_tokenizer "
                   "(aligned-span likelihood matching) or a student with the teacher's tokenizer")

    dev, cuda, bf16, dev_mem = _device(device)
    if dtype == "bfloat16" and bf16.startswith("no"):
        notes.append(f"bfloat16 is not supported on {dev}: use dtype=float32")
    memory = estimate_memory(student_params=s_info.params, teacher_params=t_info.params,
                             lora_params=s_info.lora_params, layers=s_info.layers, hidden=s_info.hidden,
                             intermediate=s_info.intermediate, teacher_hidden=t_info.hidden,
                             student_vocab=s_info.head_rows,
                             teacher_vocab=t_info.head_rows, batch_size=batch_size, seq_len=seq_len, dtype=dtype,
                             chunk_size=chunk_size)
    if dev_mem is not None:
        for label, total in (("plain logits", memory.total_plain), ("fused kernel", memory.total_fused)):
            if total > dev_mem:
                notes.append(f"estimated {total / GiB:.1f} GiB with {label} exceeds {dev}'s "
                             f"{dev_mem / GiB:.1f} GiB: lower batch_size/seq_len, use LoRA or the fused kernel")
    return CheckReport(t_info, s_info, compatible, reasons, verdict, dev, str(dtype), cuda, bf16, dev_mem, memory,
                       notes)


def render(report: CheckReport, console=None) -> None:
    """Print the report as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t, s = report.teacher, report.student
    table = Table("", "teacher", "student", title="kdkit check")
    table.add_row("model", t.name, s.name)
    table.add_row("parameters", f"{t.params:,}", f"{s.params:,}" + (f" (+{s.lora_params:,} LoRA)" if s.lora_params
                                                                   else ""))
    table.add_row("layers / hidden", f"{t.layers} / {t.hidden}", f"{s.layers} / {s.hidden}")
    table.add_row("tokenizer vocab", f"{t.tokenizer_size:,}", f"{s.tokenizer_size:,}")
    table.add_row("lm_head rows", f"{t.head_rows:,}", f"{s.head_rows:,}")
    for k in SPECIAL:
        table.add_row(f"{k} token (id)", f"{t.special[k][0]!r} ({t.special[k][1]})",
                      f"{s.special[k][0]!r} ({s.special[k][1]})")
    table.add_row("tokenizer", "[green]same[/]" if report.compatible else "[red]different[/]", "")
    console.print(table)
    console.print(f"device {report.device} (CUDA available: {'yes' if report.cuda else 'no'}), dtype "
                  f"{report.dtype}, bf16 supported: {report.bf16}"
                  + (f", memory {report.device_memory / GiB:.1f} GiB" if report.device_memory else ""))
    mem = Table("training memory", "formula", "GiB", title="memory estimate (e = bytes per weight)")
    for what, formula, b in report.memory.items:
        mem.add_row(what, formula, f"{b / GiB:.3f}")
    mem.add_row("logits (plain)", report.memory.logits_plain[0], f"{report.memory.logits_plain[1] / GiB:.3f}")
    mem.add_row("logits (fused kernel)", report.memory.logits_fused[0], f"{report.memory.logits_fused[1] / GiB:.3f}")
    mem.add_row("[bold]total, plain logits[/]", "", f"{report.memory.total_plain / GiB:.3f}")
    mem.add_row("[bold]total, fused kernel[/]", "", f"{report.memory.total_fused / GiB:.3f}")
    console.print(mem)
    for note in report.notes:
        console.print(f"[yellow]note[/]: {note}")
    console.print(("[green]OK[/]: " if report.compatible else "[red]INCOMPATIBLE[/]: ") + report.verdict)


@dataclass(frozen=True)
class DeviceName:
    """`auto`, `cpu`, `cuda` or `cuda:N`."""

    def ok(self, v) -> bool:
        return v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit())

    def describe(self) -> str:
        return "auto, cpu, cuda or cuda:N"


@dataclass
class CheckOptions:
    """`kdkit check` settings. On the command line `student.X=V` is student option X (`student.layers=15`) and
    `lora.X=V` a LoRA setting (`lora.r=8`, which implies lora=true)."""

    teacher: str | None = None  # a model name, hf:<id> or folder (required)
    student: str = "truncated-teacher"  # truncated-teacher, scratch, or a model name / folder
    student_options: dict[str, Any] = field(default_factory=dict)
    device: Annotated[str, DeviceName()] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    batch_size: PositiveInt = 8
    seq_len: PositiveInt = 512
    lora: bool | LoRAConfig = False  # true: LoRA adapters with the default settings
    chunk_size: PositiveInt = 1024  # tokens per chunk of the fused linear-KD kernel

    def validate(self, at: str) -> None:
        """The models' names and the student's options, by the rules a recipe's are checked with."""
        from ..config import LLMConfig, ModelConfig
        from .models import check_lm_name
        from .students import check_student

        if not self.teacher:
            raise ConfigError("kdkit check needs teacher=NAME (e.g. teacher=smollm2-135m-instruct)")
        check_lm_name(self.teacher, "teacher")
        check_student(ModelConfig(model=self.student, options=self.student_options), True,
                      LLMConfig(lora=self.lora if isinstance(self.lora, LoRAConfig) else None))


def recipe_defaults(name: str) -> dict:
    """What an LM recipe (`kdkit check recipe=smollm2-kd`) says about the models and the training shape."""
    r = load_recipe(name)
    if r.task not in ("lm", "cot"):
        raise ConfigError(f"recipe={name} is a task: {r.task} recipe; `kdkit check` checks LM recipes (task: lm or cot)")
    out = {"teacher": r.teacher.model, "student": r.student.model, "student_options": dict(r.student.options),
           "dtype": r.llm.dtype, "batch_size": r.data.batch_size, "seq_len": r.llm.block_size,
           "chunk_size": r.llm.chunk_size or 1024}
    if r.llm.lora is not None:
        out["lora"] = to_plain(r.llm.lora)
    return {k: v for k, v in out.items() if v is not None}


def check_options(settings: list[str]) -> CheckOptions:
    """`key=value` words (and `recipe=NAME`, whose models and shapes are the defaults) -> validated
    `CheckOptions`, all checked before any tokenizer or config loads."""
    recipe, settings = split_recipe(settings)
    items = [f"student_options.{i[len('student.'):]}" if i.startswith("student.") else i for i in settings]
    flags = [i for i in items if i.partition("=")[0] == "lora"]
    raw = apply_overrides(recipe_defaults(recipe) if recipe else {}, [i for i in items if i not in flags])
    if flags:
        flag = parse_overrides(flags[-1:])["lora"]
        if "lora" not in raw or flag is not True:  # lora=false wins over lora.X; lora=true adds nothing to them
            raw["lora"] = flag
    return build(CheckOptions, raw, "")


def run_check(settings: list[str]) -> int:
    """`kdkit check [recipe=NAME] teacher=... student=... [student.layers=15 dtype=bfloat16 seq_len=1024 ...]`: prints
    the report; 0 when token KD applies, 1 when the tokenizers (or heads) differ."""
    opts = check_options(settings)
    report = preflight(opts.teacher, opts.student, student_options=opts.student_options, device=opts.device,
                       dtype=opts.dtype, batch_size=opts.batch_size, seq_len=opts.seq_len,
                       lora=opts.lora if opts.lora is not True else LoRAConfig(), chunk_size=opts.chunk_size)
    render(report)
    return 0 if report.compatible else 1
