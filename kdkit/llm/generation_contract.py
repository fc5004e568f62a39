"""What every generation backend is given and returns, and what it must mean the same on each: `SamplingSpec`,
`Completion`, the `GenerationBackend` protocol, prompt formatting and encoding, and the checks on results.

The backends (`generation_hf`, `generation_vllm`) import this module and nothing else of each other; the choice
between them is `generation.make_backend`. What "the same meaning" pins down, on both backends:
- prompts are already-formatted text (`chat_prompt` applies the chat template); they are tokenized by
  `encode_prompt`, once, identically for both (vLLM receives the token ids, not the text);
- `temperature == 0` is greedy; otherwise plain temperature + nucleus (top-p) sampling, with no top-k and no
  repetition penalty (transformers would add top_k=50 and a model's generation_config its own defaults);
- `stop` strings end a completion; the returned text stops before the first one (stop string and what follows
  are cut); EOS ends it too; special tokens are not in the text;
- `Completion.num_tokens` counts the tokens the model generated for it, the EOS or the token that completed a
  stop string included (what the completion cost); `finish_reason` is "stop" (EOS or stop string) or "length"
  (`max_new_tokens` reached).
Empty completions (the model stopped at once, or a stop string matched at the start) are kept, counted and
logged as a warning naming the prompts; if every completion is empty, `EmptyGenerationError` says why that
usually happens instead of letting an empty data set flow into training.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ..errors import ConfigError, KdkitError

log = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length")


class EmptyGenerationError(KdkitError, RuntimeError):
    """Every completion a backend returned is empty: nothing to learn from, and almost always a set-up mistake."""


@dataclass
class SamplingSpec:
    """What to generate; the same meaning on every backend (see the module docstring)."""

    n: int = 1  # completions per prompt
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)  # strings that end a completion (not included in the text)
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        if not isinstance(self.n, int) or self.n < 1:
            raise ConfigError(f"sampling n (completions per prompt) must be an integer >= 1, got {self.n!r}")
        if self.temperature < 0:
            raise ConfigError(f"sampling temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sampling top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"sampling max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        bad = [s for s in self.stop if not isinstance(s, str) or not s]
        if bad:
            raise ConfigError(f"sampling stop strings must be non-empty strings, got {bad!r} in {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    text: str
    num_tokens: int
    finish_reason: str  # "stop" | "length"

    @property
    def empty(self) -> bool:
        return not self.text.strip()


@runtime_checkable
class GenerationBackend(Protocol):
    name: str

    def generate(self, prompts: list[str], spec: SamplingSpec) -> list[list[Completion]]:
        """One list of `spec.n` completions per prompt, in prompt order; prompts are already-formatted text."""
        ...


def resolve_dtype(dtype: str, cuda: bool) -> str:
    """'auto' -> bfloat16 on CUDA, float32 on CPU (CPU bf16 matmuls round differently per kernel, and the two
    backends' greedy outputs then drift apart); any other name is checked and passed through."""
    choices = ("auto", "float32", "bfloat16", "float16")
    if dtype not in choices:
        raise ConfigError(f"unknown dtype {dtype!r} for generation; choose one of {', '.join(choices)}")
    if dtype == "auto":
        return "bfloat16" if cuda else "float32"
    return dtype


def chat_prompt(tokenizer, user_text: str, system: str | None = None) -> str:
    """The model's chat template applied to one user turn (and an optional system turn), ending with the
    assistant header so that generation continues as the assistant's answer."""
    if not isinstance(user_text, str) or not user_text.strip():
        raise ConfigError(f"chat_prompt: the user text is empty ({user_text!r}); a question is needed")
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        raise ConfigError(f"the tokenizer of {name} has no chat template, so a chat prompt cannot be built: use an "
                          "instruction-tuned model (e.g. smollm2-135m-instruct), set tokenizer.chat_template, or "
                          "format the prompts yourself")
    messages = ([{"role": "system", "content": system}] if system is not None else [])
    messages.append({"role": "user", "content": user_text})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def check_prompts(prompts: list[str]) -> None:
    """A clear error for what no backend can generate from: a bare string, non-text or empty prompts."""
    if isinstance(prompts, str):
        raise ConfigError("generate() takes a list of prompts, got one string; wrap it: [prompt]")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p]
    if bad:
        raise ConfigError(f"prompts {bad[:10]} are empty or not text (of {len(prompts)}); every prompt needs text "
                          "(apply the chat template with chat_prompt)")


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of one formatted prompt, the same for every backend.

    The tokenizer's special tokens are added (a Llama-2 style BOS) unless the text already begins with the BOS
    token's text, as chat templates that write BOS themselves do (SmolLM2's BOS is its `<|im_start|>`): a
    doubled BOS changes what the model generates.
    """
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])


def first_stop(text: str, stop: list[str]) -> int:
    """Index in `text` where the earliest stop string begins, or -1."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else -1


def replicate(results: list[list[Completion]], n: int) -> list[list[Completion]]:
    """Greedy decoding gives one answer per prompt: n copies of it (neither backend need decode n times)."""
    return [[Completion(c.text, c.num_tokens, c.finish_reason) for c in row for _ in range(n)] for row in results]


@dataclass
class GenerationStats:
    """Counts over one `generate` result, for logs, benchmarks and the pipeline's report."""

    prompts: int
    completions: int
    tokens: int
    empty: int
    empty_prompts: list[int]  # prompts with at least one empty completion
    finish: dict[str, int]


def summarize(results: list[list[Completion]]) -> GenerationStats:
    flat = [c for row in results for c in row]
    return GenerationStats(
        prompts=len(results), completions=len(flat), tokens=sum(c.num_tokens for c in flat),
        empty=sum(c.empty for c in flat), empty_prompts=[i for i, row in enumerate(results) if any(c.empty for c in row)],
        finish=dict(Counter(c.finish_reason for c in flat)))


def report_empty(results: list[list[Completion]], backend: str, spec: SamplingSpec) -> GenerationStats:
    """Warn about empty completions; raise `EmptyGenerationError` when all of them are empty."""
    stats = summarize(results)
    if stats.completions and stats.empty == stats.completions:
        raise EmptyGenerationError(
            f"{backend}: all {stats.completions} completions are empty. Usual causes: the prompts lack the "
            f"assistant header (build them with chat_prompt, add_generation_prompt), a stop string matches at the "
            f"very start of the answer (stop={spec.stop!r}), or the model emits EOS at once (a base model given a "
            "chat prompt, or a broken checkpoint)")
    if stats.empty:
        shown = ", ".join(map(str, stats.empty_prompts[:10])) + (" ..." if len(stats.empty_prompts) > 10 else "")
        log.warning("%s: %d of %d completions are empty (prompts %s); they are returned as empty text with "
                    "finish_reason set, filter them before training", backend, stats.empty, stats.completions, shown)
    return stats
