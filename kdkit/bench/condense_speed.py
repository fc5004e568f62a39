"""`kdkit bench condense-speed`: trajectory matching and expert training against the reference MTT code.

`kdkit bench condense-speed steps=10,30 [ipc=10 width=128 repeats=2 impls=... memory_steps=80]` times one
trajectory-matching iteration (forward + backward through N student steps) on CIFAR-10 shapes: ConvNet-3 with
instance norm, IPC × 10 synthetic images, batch_syn = all of them, no augmentation, fp32. Each implementation
runs in its own process: a warm-up iteration (it compiles, for the compiled modes), then the best of `repeats`;
peak memory is the growth of the process's peak resident set over one iteration (CPU) or
`max_memory_allocated` (CUDA). Expert training is timed as one epoch of 20 batches of 256 with DSA, SGD lr 0.01,
as in `buffer.py`.

The reference is GeorgeCazenavette/mtt-distillation (`distill.py`'s inner loop on its own `ConvNet` and
`ReparamModule`; `buffer.py`'s `epoch`). It runs when its code is in `.refs/mtt-distillation` (or
`KDKIT_REFS_DIR/mtt-distillation`); kdkit never commits it. Rows without it say so. Results go to
`leaderboards/results/condense-speed/`, the table to `leaderboards/condense-speed.md`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..config import PositiveInt, bad_value, coerce
from ..errors import ConfigError
from .results import REPO, bench_options, read_results, write_result

KIND = "condense-speed"
TABLE = REPO / "leaderboards" / "condense-speed.md"
TM_IMPLS = ("reference", "kdkit-unrolled", "kdkit-constant-memory", "kdkit-unrolled-compiled",
            "kdkit-constant-memory-compiled")
EXPERT_IMPLS = ("expert-reference", "expert-kdkit", "expert-kdkit-compiled")
IMPLS = TM_IMPLS + EXPERT_IMPLS
GOAL_SPEED, GOAL_MEMORY_OVERHEAD, GOAL_FLAT = 2.0, 1.2, 0.10


def refs_dir() -> Path:
    return Path(os.environ.get("KDKIT_REFS_DIR") or REPO / ".refs") / "mtt-distillation"


def _int_list(value, key: str) -> list[int]:
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
    try:
        return [coerce(int(str(i).strip()), PositiveInt, key) for i in items]
    except ValueError:
        raise bad_value(key, value, "integers >= 1 (a comma list such as 10,30)") from None


@dataclass
class CondenseSpeedBench:
    steps: list[PositiveInt] | PositiveInt | str = "10,30"  # syn_steps N to time
    memory_steps: PositiveInt | None = 80  # one more N for compiled constant-memory: is its memory flat in N?
    impls: list[str] | str = ",".join(IMPLS)
    ipc: PositiveInt = 10
    width: PositiveInt = 128
    repeats: PositiveInt = 2
    threads: PositiveInt | None = None  # torch threads per process (None: torch's default)
    table: bool = True  # False: write the result file only

    def validate(self, at: str) -> None:
        self.steps = _int_list(self.steps, f"{at}steps")
        impls = self.impls.split(",") if isinstance(self.impls, str) else list(self.impls)
        self.impls = [i.strip() for i in impls if i.strip()]
        for i in self.impls:
            if i not in IMPLS:
                raise ConfigError(f"{at}impls: unknown implementation '{i}'; choices: {', '.join(IMPLS)}")


def run_condense_speed(settings: list[str] | None = None) -> Path:
    """Every (implementation, N) in its own process; one result file; the table regenerated."""
    opts = bench_options(CondenseSpeedBench, list(settings or []))
    have_ref = (refs_dir() / "networks.py").is_file()
    rows, path = [], None
    jobs = [(impl, n) for impl in opts.impls if impl in TM_IMPLS for n in opts.steps]
    if opts.memory_steps and opts.memory_steps not in opts.steps:
        jobs += [(impl, opts.memory_steps) for impl in opts.impls if impl == "kdkit-constant-memory-compiled"]
    jobs += [(impl, 0) for impl in opts.impls if impl in EXPERT_IMPLS]
    for impl, n in jobs:
        if "reference" in impl and not have_ref:
            rows.append({"impl": impl, "syn_steps": n, "status": f"skipped: no reference code in {refs_dir()}"})
            print(rows[-1], flush=True)
            path = write_result(KIND, {"rows": rows, "reference_present": have_ref}, path=path)
            continue
        spec = {"impl": impl, "syn_steps": n, "ipc": opts.ipc, "width": opts.width, "repeats": opts.repeats,
                "threads": opts.threads, "refs": str(refs_dir())}
        proc = subprocess.run([sys.executable, "-m", "kdkit.bench.condense_speed_worker", json.dumps(spec)],
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            row = {**spec, "status": f"failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:300]}"}
        else:
            row = {**spec, **json.loads(lines[-1]), "status": "ok"}
        row.pop("refs", None)
        rows.append(row)
        print(row, flush=True)
        path = write_result(KIND, {"rows": rows, "reference_present": have_ref}, path=path)  # row by row
    print(f"wrote {path}")
    return write_table() if opts.table else path


def _fmt_gib(b) -> str:
    return "-" if b is None else f"{b / 2 ** 30:.2f}"


def write_table(results_dir: Path | None = None, out: Path | None = None) -> Path:
    """One table per result file (the ratios only mean something within one run)."""
    lines = ["# Trajectory matching and expert training speed (CIFAR-10 shapes)", "",
             "Generated by `kdkit bench condense-speed` from `leaderboards/results/condense-speed/*.json`. One "
             "trajectory-matching iteration (forward + backward through N student steps): ConvNet-3 width 128, "
             "instance norm, IPC 10 (100 synthetic images), batch_syn 100, no augmentation, fp32. Each "
             "implementation in its own process; seconds are the best of the repeats after a warm-up "
             "(compilation happens in the warm-up); memory is the peak resident-set growth over one iteration. "
             "`reference`: GeorgeCazenavette/mtt-distillation's `distill.py` inner loop on its own ConvNet and "
             "ReparamModule, run from a local copy that is never committed. `compiled` rows are the same math "
             "through `torch.compile` (`compile=true`, the default of `--method mtt/datm`).", "",
             f"Goals: kdkit at least {GOAL_SPEED:g}x the reference at each N; constant-memory at most "
             f"{GOAL_MEMORY_OVERHEAD:g}x kdkit's unrolled time; constant-memory peak memory flat in N (within "
             f"{GOAL_FLAT:.0%} from N = 10 to the largest N); expert training at least as fast as `buffer.py`.", ""]
    for rec in read_results(KIND, results_dir):
        rows = [r for r in rec["rows"] if r.get("status") == "ok"]
        hw = rec["hardware"]
        lines += [f"## {rec['time']} · {hw.get('cpu') if hw.get('device') == 'cpu' else hw.get('device')}", "",
                  f"torch {hw.get('torch')}, {hw.get('threads')} threads, commit {rec.get('git_commit')}; "
                  f"`{rec['command']}`", "",
                  "| N | implementation | s / iteration | peak GiB | speed vs reference | time vs kdkit unrolled "
                  "(same compile) | goal |", "|---|---|---|---|---|---|---|"]
        ref = {r["syn_steps"]: r["seconds"] for r in rows if r["impl"] == "reference"}
        unrolled = {(r["syn_steps"], r["impl"].endswith("compiled")): r["seconds"] for r in rows
                    if r["impl"].startswith("kdkit-unrolled")}
        cm_mem = {}
        for r in rows:
            if r["impl"] in TM_IMPLS and "constant-memory" in r["impl"]:
                cm_mem.setdefault(r["impl"], {})[r["syn_steps"]] = r["peak_bytes"]
        for r in sorted((r for r in rows if r["impl"] in TM_IMPLS), key=lambda r: (r["syn_steps"], TM_IMPLS.index(r["impl"]))):
            n, s = r["syn_steps"], r["seconds"]
            speed = f"{ref[n] / s:.2f}x" if n in ref and r["impl"] != "reference" else "-"
            u = unrolled.get((n, r["impl"].endswith("compiled")))
            rel = f"{s / u:.2f}x" if u and "constant-memory" in r["impl"] else "-"
            goal = []
            if r["impl"] != "reference" and n in ref:
                goal.append(f"speed {'yes' if ref[n] / s >= GOAL_SPEED else 'NO'}")
            if rel != "-":
                goal.append(f"overhead {'yes' if s / u <= GOAL_MEMORY_OVERHEAD else 'NO'}")
            mem = cm_mem.get(r["impl"], {})
            if "constant-memory" in r["impl"] and len(mem) > 1 and n == max(mem) and mem.get(min(mem)):
                growth = mem[n] / mem[min(mem)] - 1
                goal.append(f"flat {'yes' if growth <= GOAL_FLAT else 'NO'} ({growth:+.0%} vs N={min(mem)})")
            lines.append(f"| {n} | {r['impl']} | {s:.2f} | {_fmt_gib(r.get('peak_bytes'))} | {speed} | {rel} | "
                         f"{', '.join(goal) or '-'} |")
        ex = {r["impl"]: r for r in rows if r["impl"] in EXPERT_IMPLS}
        if ex:
            lines += ["", "| expert training | s / epoch (20 x 256, DSA) | speed vs buffer.py | goal |",
                      "|---|---|---|---|"]
            refs = ex.get("expert-reference", {}).get("seconds")
            for impl, r in ex.items():
                ratio = f"{refs / r['seconds']:.2f}x" if refs and impl != "expert-reference" else "-"
                goal = "-" if ratio == "-" else ("yes" if refs / r["seconds"] >= 1.0 else "NO")
                lines.append(f"| {impl} | {r['seconds']:.2f} | {ratio} | {goal} |")
        skipped = [r for r in rec["rows"] if r.get("status") != "ok"]
        if skipped:
            lines += [""] + [f"- {r['impl']} N={r['syn_steps']}: {r['status']}" for r in skipped]
        lines.append("")
    out = Path(out or TABLE)
    out.write_text("\n".join(lines))
    return out


__all__ = ["run_condense_speed", "write_table", "refs_dir"]
