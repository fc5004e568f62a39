"""Run every bad command line of `tests/bad_inputs.py` as a real `kdkit` process and count the outcomes.

    python scripts/fuzz_cli.py [--timeout 30] [--jobs 2] [--out fuzz.json]

Each case runs in its own scratch folder (so a default `output_dir=runs` lands there) and is counted as
- clear: exit code 2, one `kdkit: error:` line on stderr, no traceback, no run folder;
- traceback: a Python traceback was printed;
- accepted: exit code 0, or still working when the timeout hit (the bad value started real work);
- other: anything else (another exit code, several lines, a run folder left behind).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from bad_inputs import CASES  # noqa: E402


def scratch(root: Path) -> Path:
    (root / "empty").mkdir(parents=True, exist_ok=True)
    (root / "corrupt.safetensors").write_bytes(os.urandom(256))
    (root / "checkpoint.pt").write_bytes(b"\x80\x04\x95planted pickle")
    return root


def classify(rc: int | None, out: str, err: str, left: list[str]) -> str:
    if "Traceback" in out or "Traceback" in err:
        return "traceback"
    if rc is None or rc == 0:
        return "accepted"
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    if rc == 2 and len(lines) == 1 and lines[0].startswith("kdkit: error:") and not left:
        return "clear"
    return "other"


def run_case(args: list[str], timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="kdkit-fuzz-") as d:
        root = scratch(Path(d))
        work = root / "work"
        work.mkdir()
        argv = [a.replace("{tmp}", str(root)) for a in args]
        env = dict(os.environ, PYTHONPATH=str(REPO), KDKIT_RESULTS_DIR=str(root / "results"))
        t0 = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, "-m", "kdkit.cli", *argv], cwd=work, env=env, text=True,
                               capture_output=True, timeout=timeout)
            rc, out, err = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as e:
            rc, out, err = None, str(e.stdout or ""), str(e.stderr or "")
        seconds = time.perf_counter() - t0
        left = sorted(p.name for p in work.iterdir())
    verdict = classify(rc, out, err, left)
    last = [ln for ln in (err or "").strip().splitlines() if ln.strip()][-1:] or [""]
    return {"args": args, "verdict": verdict, "rc": rc, "seconds": round(seconds, 2), "left": left,
            "last_line": last[0][:300]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=None)
    ns = ap.parse_args()
    with ThreadPoolExecutor(ns.jobs) as pool:
        rows = list(pool.map(lambda a: run_case(a, ns.timeout), CASES))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
        if r["verdict"] != "clear":
            print(f"{r['verdict']:9s} kdkit {' '.join(r['args'])}  ->  {r['last_line']}")
    print(json.dumps({"cases": len(rows), **counts}))
    if ns.out:
        Path(ns.out).write_text(json.dumps({"counts": counts, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
