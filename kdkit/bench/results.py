"""Result files: one JSON per benchmark run, with the hardware, the command and the git commit that made it."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
# KDKIT_RESULTS_DIR redirects result files (tests, scratch runs) away from the committed leaderboards
RESULTS_DIR = Path(os.environ.get("KDKIT_RESULTS_DIR") or REPO / "leaderboards" / "results")


def hardware() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": _cpu_name(), "device": "cpu"}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """The checkout's short commit; KDKIT_GIT_COMMIT where the tree has no .git (a copied working tree)."""
    if os.environ.get("KDKIT_GIT_COMMIT"):
        return os.environ["KDKIT_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=REPO, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_result(kind: str, record: dict, directory: Path | None = None, path: Path | None = None) -> Path:
    """Write `record` (plus hardware, command, commit, time) as results/<kind>/<stamp>.json (or over `path`: a
    bench that writes its rows as they come rewrites one file)."""
    directory = Path(directory or RESULTS_DIR / kind)
    directory.mkdir(parents=True, exist_ok=True)
    full = {"kind": kind, "command": "kdkit " + " ".join(sys.argv[1:])
            if sys.argv[0].endswith(("kdkit", "kdkit/cli.py")) else " ".join(sys.argv), "git_commit": git_commit(), "hardware": hardware(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{full['hardware']['device'].replace(' ', '_')}"
    if path is None:
        path, k = directory / f"{stem}.json", 1
        while path.exists():  # two results in one second keep both
            path, k = directory / f"{stem}-{k}.json", k + 1
    path.write_text(json.dumps(full, indent=1))
    return path


def keep_weights(weights: Path) -> Path:
    """A bench's trained weights (a CPU-protocol teacher, 2 MB; the image bench's teacher and feature classifier)
    copied into the repository as `leaderboards/teachers/SHA256[:16].safetensors`, so a later session on a fresh
    machine continues a table with the same networks instead of training others. Returns the kept path (relative
    to the repository when inside it)."""
    import shutil

    from ..checkpoint import sha256

    digest = sha256(weights)
    kept = RESULTS_DIR.parent / "teachers" / f"{digest[:16]}.safetensors"
    if not (kept.is_file() and sha256(kept) == digest):
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(weights, kept)
    return kept.relative_to(REPO) if kept.is_relative_to(REPO) else kept


def read_results(kind: str, directory: Path | None = None) -> list[dict]:
    directory = Path(directory or RESULTS_DIR / kind)
    return [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))]


def bench_options(schema, settings: list[str], passthrough: bool = False):
    """A benchmark's own `key=value` options as `schema` (a dataclass whose fields declare types and ranges), built
    by `kdkit.config` like every recipe; with `passthrough`, keys that are not the bench's own are returned apart
    (recipe overrides the bench hands on, which it must validate with its recipe before any work)."""
    from dataclasses import fields

    from ..config import apply_overrides, build

    names = {f.name for f in fields(schema)}
    own, rest = [], []
    for s in settings:
        key = s.partition("=")[0].split(".")[0]
        (own if key in names or not passthrough else rest).append(s)
    opts = build(schema, apply_overrides({}, own), "")
    return (opts, rest) if passthrough else opts


def int_list(value, key: str) -> list[int]:
    """A bench option given as an int, a list or a comma list, each >= 1 (one named error otherwise)."""
    from ..config import PositiveInt, bad_value, coerce

    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
    try:
        return [coerce(int(str(i).strip()), PositiveInt, key) for i in items]
    except ValueError:
        raise bad_value(key, value, "integers >= 1 (a comma list such as 10,30)") from None


def name_list(value, key: str, allowed) -> list[str]:
    """A bench option given as a list or a comma list of names, each one of `allowed`."""
    from ..errors import ConfigError

    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else list(value)) if n.strip()]
    for n in names:
        if n not in allowed:
            raise ConfigError(f"{key}: unknown '{n}'; choices: {', '.join(allowed)}")
    return names


def run_worker(module: str, spec: dict) -> tuple[dict | None, str]:
    """`python -m module '<json spec>'` in a process of its own: (the last JSON line it printed, or None if it
    failed or printed none; the last line of its stderr)."""
    proc = subprocess.run([sys.executable, "-m", module, json.dumps(spec)], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    err = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
    return (json.loads(lines[-1]) if lines and not proc.returncode else None), err


def run_kdkit(args: list[str]) -> tuple[list[str], float]:
    """One `kdkit ...` run in a fresh process (its own accelerate state); returns the command and its wall time.
    Its output is kept back, except its cost estimate lines (`kdkit/budget.py`), shown as they come: a bench row
    can take most of an hour."""
    import tempfile

    cmd = [sys.executable, "-m", "kdkit.cli", *args]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, text=True, stdout=subprocess.PIPE, stderr=err)
        for line in proc.stdout:
            if line.startswith("estimate: "):
                print(f"  {args[0]} {next((a for a in args if a.startswith('name=')), '')}: {line.rstrip()}",
                      flush=True)
        if proc.wait() != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{err.read()[-3000:]}")
    return cmd, time.perf_counter() - t0


def run_record(kind: str, command: str, cmd: list[str], wall_seconds: float, **fields) -> dict:
    """The result row of one bench run: what it measured plus the commands, commit, hardware and time."""
    return {"kind": kind, **fields, "run_command": " ".join(cmd[2:]), "command": command,
            "wall_seconds": wall_seconds, "git_commit": git_commit(), "hardware": hardware(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def mean_std(values: list[float], fmt: str = ".2f", scale: float = 1.0, suffix: str = "") -> str:
    """A leaderboard cell: 'mean ± std' over seeds (sample std), the value alone for one seed, '—' for none."""
    if not values:
        return "—"
    xs = [scale * v for v in values]
    if len(xs) == 1:
        return f"{format(xs[0], fmt)}{suffix}"
    return f"{format(statistics.mean(xs), fmt)} ± {format(statistics.stdev(xs), fmt)}{suffix}"
