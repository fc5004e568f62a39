"""`kdkit bench condense-images`: image-condensation leaderboard rows and `leaderboards/condense-cifar10.md`.

`kdkit bench condense-images methods=dm ipcs=10 [any image-condensation setting, e.g. iterations=200
train_subset=5000 width=128 eval_epochs=300 eval_nets=3]` runs each (method, IPC), evaluates it with the
ConvNet-3 protocol next to the same number of random real images per class, writes one result file per row
under `leaderboards/results/condense-cifar10/` and regenerates the markdown table from all result files.
`kdkit bench condense-images table=only` regenerates the table alone.

CV-DD (`methods=cvdd`, e.g. `methods=cvdd preset=cpu`) is evaluated with the relabel protocol (b) and goes in a
table of its own: the synthetic set with the committee's FKD crop labels, beside the random real images with
the same committee crop labels and with hard labels (same stored crops, CutMix, optimiser, student and epochs).

Every shortening of the papers' budgets (iterations, training subset, width, evaluation epochs and nets,
expert count/length) is stored in the row and printed in the table, so no CPU row poses as a paper number.

Every row also carries DD-Ranking's scores (`kdkit/condense/dd_ranking.py`): HLR, IOR and DDRS, computed by the
run's own evaluation (`baseline=true`), with the full-data accuracy HLR needs and its budget (`full_epochs`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..config import PositiveInt, bad_value, coerce
from ..errors import ConfigError
from .results import RESULTS_DIR, bench_options, read_results, write_result

KIND = "condense-cifar10"
TABLE = Path(__file__).resolve().parents[2] / "leaderboards" / "condense-cifar10.md"
# ConvNet-3 test accuracy (%) reported by the papers, IPC 1 / 10 / 50.
# CV-DD's ResNet-18 (relabel protocol) CIFAR-10 numbers from the reference repository's results table.
PAPER_RELABEL = {"cvdd": {1: 26.1, 10: 44.6, 50: 70.1}}
PAPER = {"mtt": {1: 46.3, 10: 65.3, 50: 71.6}, "datm": {1: 46.9, 10: 66.8, 50: 76.1}, "dm": {1: 26.0, 10: 48.9, 50: 63.0}}
PAPER_BUDGET = {"dm": "20,000 iterations, full train set, width 128, eval 1,000 epochs x 5 nets",
                "mtt": "100 experts x 50 epochs, 5,000 iterations, width 128, eval 1,000 epochs x 5 nets",
                "datm": "100 experts x 50 epochs, 10,000 iterations, width 128, eval 1,000 epochs x 5 nets",
                "cvdd": "committee ResNet-18/50, ShuffleNetV2, MobileNetV2, DenseNet-121 (200 epochs each), "
                        "2 voters, 4,000 iterations per batch, 300 epochs of crop labels, ResNet-18 student 300 "
                        "epochs"}
REFERENCE_KIND = "condense-cifar10-reference"  # `kdkit bench condense-reference` rows
# the settings a kdkit row must share with a reference row to stand beside it
MATCH_KEYS = ("width", "train_subset", "test_subset", "experts", "expert_epochs", "syn_steps", "iterations",
              "eval_epochs", "eval_nets", "batch_real")
REFERENCE_NOTE = (
    "Reference code, same budget: GeorgeCazenavette/mtt-distillation's `buffer.py` + `distill.py`, unmodified, "
    "run by `kdkit bench condense-reference` on the same CIFAR-10 subset with the row's budget (experts, student "
    "steps, start epochs, iterations, learning rates) and evaluated by its own `evaluate_synset` with the same "
    "nets x epochs; mean ± std over its evaluation networks. Seconds: kdkit's condensation (experts + iterations) "
    "against the reference's `buffer.py` + `distill.py` (or `main_DM.py`) wall time less the training time of "
    "its evaluation networks (which it runs inside its loop, at iteration 0 and at the last).")
CVDD_KEYS = ("recipe", "members", "member_epochs", "iterations", "recover_lr", "patch_candidates", "train_subset",
             "test_subset", "eval_student", "eval_epochs", "eval_nets")
SHORTENING_KEYS = ("iterations", "train_subset", "test_subset", "width", "eval_epochs", "eval_nets", "batch_real",
                   "experts", "expert_epochs", "syn_steps", "tesla", "zca")


DD_RANKING_NOTE = (
    "HLR, IOR, DDRS: DD-Ranking's label-robust scores (Li et al. 2025, arXiv:2505.13300; "
    "github.com/NUS-HPC-AI-Lab/DD-Ranking), computed by kdkit's own evaluation (`kdkit/condense/dd_ranking.py`). "
    "HLR (hard-label recovery, lower is better) = accuracy of a network trained on the whole training (sub)set "
    "with hard labels (its budget is in the row) minus that of the synthetic images trained with hard labels "
    "(their class slot; for a hard-label method its own evaluation). IOR (improvement over random, higher is "
    "better) = the synthetic set under its own evaluation minus the same number of random real images per class "
    "under the same evaluation and kind of labels (DATM: labelled by the logits of the expert its soft labels "
    "start from, named in the cell). Both in percentage points, mean ± std over the evaluation networks paired "
    "round by round. DDRS = (e^a - e^-1) / (e - e^-1) with a = 0.5 IOR - 0.5 HLR on fractions, in [0, 1], higher "
    "is better (the paper's label-robust score, LRS, named DDRS in the repository's first release). A dash (—): a "
    "row made before kdkit computed them.")


@dataclass
class CondenseImagesBench:
    """The bench's own options; any other `key=value` is a `kdkit condense` setting, given to each method that has
    it (`experts=10` reaches mtt and datm, not dm) and refused when none has."""

    methods: list[str] | str = "dm"  # a list or a comma list
    ipcs: list[PositiveInt] | PositiveInt | str = 10  # a list or a comma list
    table: Literal["run", "only"] = "run"  # only: regenerate the table (speed: `kdkit bench condense-speed`)

    def validate(self, at: str) -> None:
        self.methods = [m.strip() for m in (self.methods.split(",") if isinstance(self.methods, str)
                                            else self.methods) if m.strip()]
        ipcs = self.ipcs
        items = ipcs.split(",") if isinstance(ipcs, str) else ipcs if isinstance(ipcs, list) else [ipcs]
        try:
            self.ipcs = [coerce(int(str(i).strip()), PositiveInt, f"{at}ipcs") for i in items]
        except ValueError:
            raise bad_value(f"{at}ipcs", ipcs, "integers >= 1 (a list, or a comma list such as 1,10)") from None


def _configs(opts: CondenseImagesBench, rest: list[str]) -> list:
    """Every (method, IPC) config, validated before the first run; each method gets the settings it has."""
    from ..condense.image_run import build_image_config
    from ..condense.resolve import setting_names

    accepted = {m: setting_names("image", "cifar10", m) for m in opts.methods}
    for item in rest:
        key = item.partition("=")[0].strip().split(".")[0]
        if not any(key in names for names in accepted.values()):
            raise ConfigError(f"unknown setting '{key}' for methods {', '.join(opts.methods)}; settings: "
                              f"{', '.join(sorted(set().union(*accepted.values()) - {'options'}))}")
    return [build_image_config("cifar10", method, [s for s in rest if s.partition("=")[0].strip().split(".")[0]
                                                   in accepted[method]] + ["baseline=true"], ipc=ipc)
            for method in opts.methods for ipc in opts.ipcs]


def run_condense_images(settings: list[str] | None = None) -> Path:
    from ..condense.image_run import run_image_condense

    settings = list(settings or [])
    opts, rest = bench_options(CondenseImagesBench, settings, passthrough=True)
    if opts.table == "only" and rest:
        raise ConfigError(f"table=only regenerates the table from the result files; it takes no settings ({rest[0]})")
    if opts.table != "only":
        for cfg in _configs(opts, rest):
            m = run_image_condense(cfg)
            record = {"method": cfg.method, "ipc": cfg.ipc, "protocol": cfg.eval,
                      "acc_mean": 100 * m["eval"]["mean"], "acc_std": 100 * m["eval"]["std"],
                      "random_real_mean": 100 * m["random_real"]["mean"],
                      "random_real_std": 100 * m["random_real"]["std"],
                      "image_bytes": m["eval"]["image_bytes"], "label_bytes": m["eval"]["label_bytes"],
                      "condense_seconds": m["condense_seconds"], "setup_seconds": m.get("setup_seconds"),
                      "run_dir": m["run_dir"],
                      "settings": {k: cfg.setting(k) for k in
                                   (CVDD_KEYS if cfg.method == "cvdd" else SHORTENING_KEYS)}}
            record.update(dd_ranking_fields(m))
            if cfg.method == "cvdd":
                rr = m["random_real_relabelled"]
                record.update({"random_real_relabelled_mean": 100 * rr["mean"],
                               "random_real_relabelled_std": 100 * rr["std"],
                               "student": m["eval"]["student"], "committee": m["committee"],
                               "relabel_seconds": m["relabel_seconds"]})
            print(f"wrote {write_result(KIND, record)}")
    return write_table()  # `kdkit bench` prints the path


def dd_ranking_fields(m: dict) -> dict:
    """The row's DD-Ranking fields from a run's metrics: HLR and IOR in percentage points (as the accuracies),
    DDRS in [0, 1], the accuracies they came from and the full-data network's budget; {} without them."""
    dd, full = m.get("dd_ranking"), m.get("full_data")
    if not dd or not full:
        return {}
    row = {f"{k}_{s}": (v if k == "ddrs" else 100 * v) for k in ("hlr", "ior", "ddrs")
           for s, v in (("mean", dd[k]), ("std", dd[f"{k}_std"]))}
    row["dd_ranking"] = {"weight": dd["weight"], "rounds": dd["rounds"], "syn_hard": dd["syn_hard"],
                         "syn_any": dd["syn_any"], "rdm_any": dd["rdm_any"], "rdm_labels": dd["rdm_labels"],
                         **{k: 100 * dd[k] for k in ("acc_full", "acc_syn_hard", "acc_syn_any", "acc_rdm_any")},
                         **({"note": dd["note"]} if dd.get("note") else {})}
    row["full_data"] = {"acc": 100 * full["mean"], **{k: full.get(k) for k in (
        "protocol", "student", "epochs", "images", "steps", "batch_size", "lr", "width", "augmentation", "seconds",
        "device", "cached")}}
    return row


def _dd_cells(r: dict, hard_labels_note: bool) -> list[str]:
    """The HLR, IOR and DDRS cells of a row ("—" for rows made before the scores existed)."""
    if "hlr_mean" not in r:
        return ["—"] * 3
    labels = r.get("dd_ranking", {}).get("rdm_labels", "hard")
    ior_note = f" (random real: {labels} labels)" if hard_labels_note and labels != "hard" else ""
    return [f"{r['hlr_mean']:.1f} ± {r['hlr_std']:.1f}", f"{r['ior_mean']:.1f} ± {r['ior_std']:.1f}{ior_note}",
            f"{r['ddrs_mean']:.3f} ± {r['ddrs_std']:.3f}"]


def _full_budget(r: dict) -> str:
    f = r.get("full_data")
    if not f:
        return ""
    net = f"{f['protocol']}" + (f" ({f['student']})" if f.get("student") else "")
    return (f"; full data (HLR): {net} {f['acc']:.1f} after {f['epochs']} epochs on {f['images']:,} images, "
            "no augmentation")


def matching_reference(row: dict, reference_rows: list[dict]) -> dict | None:
    """The newest reference row with `row`'s method, IPC and budget (MATCH_KEYS), or None."""
    s = row.get("settings", {})
    keys = [k for k in MATCH_KEYS if s.get(k) is not None]  # a method's own budget keys (DM has no experts)
    hits = [r for r in reference_rows if r["method"] == row["method"] and r["ipc"] == row["ipc"]
            and all(r["settings"].get(k) == s.get(k) for k in keys)]
    return max(hits, key=lambda r: r["time"]) if hits else None


def write_table(results_dir: Path | None = None, out: Path | None = None) -> Path:
    rows = read_results(KIND, results_dir)
    relabel_rows = [r for r in rows if r.get("protocol", "convnet") != "convnet"]
    rows = [r for r in rows if r.get("protocol", "convnet") == "convnet"]
    lines = [
        "# CIFAR-10 dataset condensation (ConvNet-3 evaluation protocol)",
        "",
        "Test accuracy (%) of fresh ConvNet-3s (instance norm) trained on the condensed set, mean ± std over the",
        "evaluation networks, beside the paper's number and beside the same number of random real images per",
        "class evaluated identically. Generated by `kdkit bench condense-images` from",
        "`leaderboards/results/condense-cifar10/*.json`; do not edit by hand.",
        "",
        "Notes: kdkit's offline CIFAR-10 is the Hub copy, stored as JPEG-compressed images, not the original",
        "lossless arrays, so even full-budget numbers may sit slightly below the papers'. The papers' budgets are",
        "below; every row states its own budget, and rows run on a CPU are heavily shortened — they show that the",
        "method beats random real images, not that it reaches the paper. Relabel-protocol (ResNet-18, soft",
        "labels) numbers are in a separate table below: they are not comparable with these.",
        "",
        "| method | IPC | ours | random real | reference code, same budget | seconds: ours / reference | HLR ↓ | "
        "IOR ↑ | DDRS ↑ | paper | image bytes | label bytes | device | budget (shortened) | command |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    references = read_results(REFERENCE_KIND, results_dir.parent / REFERENCE_KIND if results_dir else None)
    for r in sorted(rows, key=lambda r: (r["method"], r["ipc"], r["time"])):
        s = r.get("settings", {})
        budget = ", ".join(f"{k}={v}" for k, v in s.items() if v is not None)
        paper = PAPER.get(r["method"], {}).get(r["ipc"])
        ref = matching_reference(r, references)
        ref_acc = f"{ref['acc_mean']:.1f} ± {ref['acc_std']:.1f}" if ref else "—"
        ref_time = (f"{r['condense_seconds'] + (r.get('setup_seconds') or 0):,.0f} / "
                    f"{ref.get('expert_seconds', 0) + ref['distill_seconds'] - ref.get('eval_seconds', 0):,.0f}"
                    if ref and r.get("condense_seconds") else "—")
        lines.append(
            f"| {r['method']} | {r['ipc']} | {r['acc_mean']:.1f} ± {r['acc_std']:.1f} | "
            f"{r['random_real_mean']:.1f} ± {r['random_real_std']:.1f} | {ref_acc} | {ref_time} | "
            f"{' | '.join(_dd_cells(r, True))} | {paper if paper is not None else '—'} | "
            f"{r['image_bytes']:,} | {r['label_bytes']:,} | {r['hardware'].get('device')} "
            f"({r['hardware'].get('threads')} threads) | {budget}{_full_budget(r)} | `{r['command']}` |")
    if not rows:
        lines.append("| (no results yet) | | | | | | | | | | | | | | |")
    lines += ["", REFERENCE_NOTE, "", DD_RANKING_NOTE]
    lines += ["", "## Relabel protocol (b): CV-DD with committee crop labels", "",
              "Test accuracy (%) of fresh students trained on the condensed images against stored FKD crop-level",
              "soft labels (one random-resized crop + flip + CutMix per image per epoch, labelled once by the",
              "committee with batch-specific BN statistics), beside the same number of random real images per class",
              "(i) relabelled by the same committee the same way and (ii) with hard labels through the very same",
              "stored crops, CutMix and AdamW schedule (CE instead of KL); same student, epochs and seeds. The",
              "paper's number is ResNet-18 at full budget; CPU rows use a tiny committee and a small student (named",
              "in the row), so they are not comparable with it.", "",
              "| method | IPC | student | ours | random real + committee crop labels | random real + hard labels | "
              "HLR ↓ | IOR ↑ | DDRS ↑ | paper (ResNet-18) | image bytes | label bytes | committee (val acc) | "
              "device | budget (shortened) | command |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(relabel_rows, key=lambda r: (r["method"], r["ipc"], r["time"])):
        s = r.get("settings", {})
        budget = ", ".join(f"{k}={v}" for k, v in s.items() if v is not None)
        paper = PAPER_RELABEL.get(r["method"], {}).get(r["ipc"])
        committee = ", ".join(f"{c['name']} ({100 * c['prior']:.1f})" for c in r.get("committee", []))
        rr = (f"{r['random_real_relabelled_mean']:.1f} ± {r['random_real_relabelled_std']:.1f}"
              if "random_real_relabelled_mean" in r else "—")
        lines.append(
            f"| {r['method']} | {r['ipc']} | {r.get('student') or 'resnet18'} | {r['acc_mean']:.1f} ± "
            f"{r['acc_std']:.1f} | {rr} | {r['random_real_mean']:.1f} ± {r['random_real_std']:.1f} | "
            f"{' | '.join(_dd_cells(r, False))} | "
            f"{paper if paper is not None else '—'} | {r['image_bytes']:,} | {r['label_bytes']:,} | {committee} | "
            f"{r['hardware'].get('device')} ({r['hardware'].get('threads')} threads) | {budget}{_full_budget(r)} | "
            f"`{r['command']}` |")
    if not relabel_rows:
        lines.append("| (no results yet) | | | | | | | | | | | | | | | |")
    lines += ["", "HLR, IOR and DDRS as in the table above; here syn-hard is the synthetic images trained against "
              "their class ids through their own stored crops (as the random real + hard labels column), rdm-any "
              "is the random real images with committee crop labels, and the full-data network is the row's "
              "student trained with hard labels (SGD, cosine schedule) on the whole training split."]
    lines += ["", "Paper budgets:", ""] + [f"- {m}: {b}" for m, b in PAPER_BUDGET.items()]
    lines += ["", "Paper numbers (ConvNet-3, IPC 1 / 10 / 50): " +
              "; ".join(f"{m.upper()} {v[1]} / {v[10]} / {v[50]}" for m, v in PAPER.items()) + ".",
              "Paper numbers (relabel protocol, ResNet-18, IPC 1 / 10 / 50): " +
              "; ".join(f"{m.upper()} {v[1]} / {v[10]} / {v[50]}" for m, v in PAPER_RELABEL.items()) + ".", ""]
    out = Path(out or TABLE)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    return out


__all__ = ["run_condense_images", "write_table", "RESULTS_DIR"]
