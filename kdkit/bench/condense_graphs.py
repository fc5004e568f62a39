"""`kdkit bench condense-graphs`: Mirage on the TU sets against a same-size random subset and the full data.

One `kdkit condense`-style run per dataset (all GNNs share the seed's split and condensed set, since
Mirage does not depend on the GNN), one result JSON per dataset x GNN, and
`leaderboards/condense-graphs.md` regenerated from every result file, with the paper's figure beside
ours where the paper has one and the wall time of condensation on this machine.
"""
from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..condense.catalog import KINDS
from ..config import PositiveInt, show
from ..errors import ConfigError
from .results import RESULTS_DIR, bench_options, read_results, write_result

KIND = "condense-graphs"
MARKDOWN = RESULTS_DIR.parent / "condense-graphs.md"
DEFAULT_DATASETS = ("nci1", "mutag", "proteins", "ptc_mr", "nci109")

# Mirage paper (Gupta et al., ICLR 2024), Table 2, test ROC-AUC (%): TU sets it reports that kdkit also has.
PAPER = {("nci1", "gcn"): {"mirage": 68.20, "random": 60.72}}


@dataclass
class CondenseGraphsBench:
    """The bench's own options; any other `key=value` is a `kdkit condense` setting for every dataset."""

    datasets: list[str] | str = field(default_factory=lambda: list(DEFAULT_DATASETS))  # a list or a comma list
    gnns: list[str] | str = "gcn,gin"
    seeds: PositiveInt = 5
    out: str | None = None  # write result files here and leave the leaderboard alone
    runs: str = "runs/bench-condense-graphs"  # where the run folders go

    def validate(self, at: str) -> None:
        names = self.datasets.split(",") if isinstance(self.datasets, str) else self.datasets
        self.datasets = [d.strip().lower() for d in names if d.strip()]
        bad = [d for d in self.datasets if d not in KINDS["graph"].datasets]
        if bad or not self.datasets:
            raise ConfigError(f"{at}datasets={show(names)} is not allowed: expected TU sets from "
                              f"{', '.join(KINDS['graph'].datasets)} (a list, or a comma list)")


def run_condense_graphs(settings: list[str]) -> list[dict]:
    """Run every dataset, write one result per dataset x GNN, regenerate the leaderboard (unless out=DIR)."""
    from ..condense.graph_run import build_config, run_graph_condense

    opts, overrides = bench_options(CondenseGraphsBench, list(settings), passthrough=True)
    gnns = opts.gnns if isinstance(opts.gnns, str) else ",".join(opts.gnns)
    configs = [build_config(d, overrides, gnns=gnns, seeds=opts.seeds, output_dir=opts.runs) for d in opts.datasets]
    out = Path(opts.out) if opts.out else None
    rows = []
    for cfg in configs:
        metrics = run_graph_condense(cfg)
        s = metrics["summary"]
        for gnn in cfg.gnns:
            record = {"dataset": cfg.dataset, "method": cfg.method, "gnn": gnn, "seeds": cfg.seeds,
                      "overrides": overrides, "settings": metrics["config"], "run_dir": metrics["run_dir"],
                      "condense_seconds": s["condense_seconds"], "mirage_nbytes": s["mirage_nbytes"],
                      "original_bytes": s["original_bytes"], "random_nbytes": s["random_nbytes"],
                      "random_graphs": s["random_graphs"], "records": s["records"],
                      "metrics": {what: {m: s[f"{gnn}/{what}/{m}"] for m in ("test_auc", "test_acc")}
                                  for what in ["mirage", *cfg.baselines]},
                      "per_seed": [{"seed": r["seed"], "condense_seconds": r["condense_seconds"],
                                    "mirage_nbytes": r["mirage"]["nbytes"], "records": r["mirage"]["records"],
                                    "original_bytes": r["original_bytes"], "random_nbytes": r["random"]["nbytes"],
                                    "random_graphs": r["random"]["graphs"],
                                    **{what: r["results"][gnn][what] for what in ["mirage", *cfg.baselines]}}
                                   for r in metrics["seeds"]]}
            path = write_result(KIND, record, out)  # named by the second: give it a name of its own
            named = path.with_name(f"{cfg.dataset}-{gnn}-s{cfg.first_seed}-{path.name}")
            path.replace(named)
            path = named
            rows.append(record)
            print(f"wrote {path}")
    if out is None:
        print(f"wrote {write_condense_graphs_markdown()}")
    return rows


def _pm(stat: dict | None, scale: float = 100.0) -> str:
    if not stat or stat.get("n", 0) == 0:
        return "—"
    return f"{scale * stat['mean']:.2f} ± {scale * stat['std']:.2f}"


_SEED_SETTINGS = re.compile(r"^(first_seed|seeds)=")
_WHATS = ("mirage", "random", "full")
_SIZES = ("mirage_nbytes", "random_nbytes", "random_graphs", "original_bytes", "records")


def _stat(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None and x == x]
    if not xs:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def pool_results(rows: list[dict]) -> dict[tuple, dict]:
    """Result records pooled per (dataset, GNN, settings other than which seeds ran), newest per seed.

    A seed is a deterministic split + initialisation, so `first_seed=k seeds=1` runs in separate processes
    pool into the same mean ± std as one `seeds=N` run; each pooled row keeps its seeds and newest command.
    """
    groups: dict[tuple, dict] = {}
    for r in sorted(rows, key=lambda r: r.get("time", "")):
        rest = tuple(o for o in r.get("overrides", []) if not _SEED_SETTINGS.match(o))
        g = groups.setdefault((r["dataset"], r["gnn"], " ".join(rest)), {"seeds": {}, "latest": r, "runs": 0})
        g["latest"] = r
        g["runs"] += 1
        for ps in r.get("per_seed", []):
            sizes = {k: ps.get(k, r.get(k, {}).get("mean")) for k in _SIZES}  # older records: sizes per run only
            g["seeds"][ps["seed"]] = {**ps, **sizes}
    pooled = {}
    for key, g in groups.items():
        seeds = [g["seeds"][k] for k in sorted(g["seeds"])]
        whats = [w for w in _WHATS if all(w in ps for ps in seeds)]
        r = g["latest"]
        command = r.get("command", "")
        if g["runs"] > 1:  # the single run equivalent to the pooled ones
            command = " ".join([w for w in command.split() if not _SEED_SETTINGS.match(w)] + [f"seeds={len(seeds)}"])
        pooled[key] = {"dataset": r["dataset"], "gnn": r["gnn"], "seeds": len(seeds), "seed_ids": sorted(g["seeds"]),
                       "hardware": r.get("hardware", {}), "command": command,
                       "condense_seconds": _stat([ps["condense_seconds"] for ps in seeds]),
                       **{k: _stat([ps[k] for ps in seeds]) for k in _SIZES},
                       "metrics": {w: {m: _stat([ps[w][m] for ps in seeds]) for m in ("test_auc", "test_acc")}
                                   for w in whats}}
    return pooled


def write_condense_graphs_markdown(directory: Path | None = None, path: Path | None = None) -> Path:
    """leaderboards/condense-graphs.md from the result files, seeds pooled per dataset x GNN x settings."""
    latest = pool_results(read_results(KIND, directory))
    lines = ["# Graph condensation: Mirage against a random subset and the full data",
             "",
             "Generated by `kdkit bench condense-graphs` from `leaderboards/results/condense-graphs/*.json`; do not "
             "edit by hand. Test ROC-AUC and accuracy (%), mean ± std over seeds; each seed is its own stratified "
             "80/10/10 split and GNN initialisation, scored at the epoch of best validation ROC-AUC. Seeds run as "
             "separate `first_seed=k seeds=1` invocations are pooled (the command shown is the equivalent single "
             "run). *Random* is a "
             "random subset of training graphs stored in at most Mirage's bytes (but always one graph per class, "
             "which can exceed a tiny budget); *full* trains on every training "
             "graph. Bytes: the stored arrays (see `kdkit/condense/mirage.py`). Condense time: reading the labels, "
             "decomposition into computation trees, mining and building the records, per split, one process. The paper column is the Mirage paper's (Gupta et al., "
             "ICLR 2024, Table 2) where it reports that dataset and GNN (Mirage / random), under its own protocol "
             "(one split, mean of the top 5 of 10 runs by validation), not ours.", ""]
    lines += ["| dataset | GNN | Mirage ROC-AUC | random ROC-AUC | full ROC-AUC | paper (Mirage / random) | "
              "Mirage acc | random acc | full acc | Mirage bytes | random bytes (graphs) | original bytes | "
              "condense time (s) | seeds | hardware | command |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (dataset, gnn, _), r in sorted(latest.items()):
        m = r["metrics"]
        paper = PAPER.get((dataset, gnn))
        paper_text = f"{paper['mirage']:.2f} / {paper['random']:.2f}" if paper else "—"
        hw = r.get("hardware", {})
        device = hw.get("device", "?")
        device = f"{device} ({hw.get('cpu', '')}, {hw.get('threads', '?')} threads)" if device == "cpu" else device
        lines.append(
            f"| {dataset.upper()} | {gnn.upper()} | {_pm(m['mirage']['test_auc'])} | "
            f"{_pm(m.get('random', {}).get('test_auc'))} | {_pm(m.get('full', {}).get('test_auc'))} | "
            f"{paper_text} | "
            f"{_pm(m['mirage']['test_acc'])} | {_pm(m.get('random', {}).get('test_acc'))} | "
            f"{_pm(m.get('full', {}).get('test_acc'))} | {r['mirage_nbytes']['mean']:,.0f} | "
            f"{r['random_nbytes']['mean']:,.0f} ({r['random_graphs']['mean']:.1f}) | {r['original_bytes']['mean']:,.0f} | "
            f"{r['condense_seconds']['mean']:.2f} | {r['seeds']} | {device} | `{r['command']}` |")
    lines.append("")
    path = Path(path or MARKDOWN)
    path.write_text("\n".join(lines) + "\n")
    return path


def condense_seconds_table(directory: Path | None = None) -> dict[str, float]:
    """Mean condensation wall time per dataset over the latest results (for the README and checks)."""
    out: dict[str, list[float]] = {}
    for r in read_results(KIND, directory):
        out.setdefault(r["dataset"], []).append(r["condense_seconds"]["mean"])
    return {k: statistics.mean(v) for k, v in out.items()}
