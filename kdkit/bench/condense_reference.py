"""`kdkit bench condense-reference`: the reference code on kdkit's data and budget, for the fidelity column.

`kdkit bench condense-reference methods=mtt,dm ipcs=10,1 [width=32 train_subset=5000 ...]` runs
GeorgeCazenavette/mtt-distillation (`buffer.py` for the experts, then `distill.py`) and VICO-UoE/
DatasetCondensation (`main_DM.py`) from their local copies (`.refs/mtt-distillation`, `.refs/DatasetCondensation`,
git-ignored, never committed) on the same class-balanced CIFAR-10 subset kdkit uses, with the budget of `scripts/cpu-condense.sh`: the same
expert count and length, student steps, start epochs, iterations, learning rates and evaluation (nets x epochs,
distill.py's own `evaluate_synset`: SGD momentum 0.9, weight decay 5e-4, the learned lr, DSA; the protocol
kdkit's `convnet` evaluation implements). Each IPC runs in its own process; the experts are trained once and
shared by the IPCs. One result file per row in `leaderboards/results/condense-cifar10-reference/`;
`leaderboards/condense-cifar10.md` shows it beside kdkit's row of the same method, IPC and budget.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import NonNegFloat, PositiveFloat, PositiveInt
from ..errors import ConfigError
from .condense_images import REFERENCE_KIND as KIND
from .condense_images import write_table
from .condense_speed import refs_dir
from .results import REPO, bench_options, int_list, name_list, run_worker, write_result

REPOSITORIES = {"mtt": ("mtt-distillation", "GeorgeCazenavette/mtt-distillation", "distill.py"),
                "dm": ("DatasetCondensation", "VICO-UoE/DatasetCondensation", "main_DM.py")}



@dataclass
class CondenseReferenceBench:
    methods: list[str] | str = "mtt,dm"
    ipcs: list[PositiveInt] | PositiveInt | str = "10,1"
    width: PositiveInt = 32
    train_subset: PositiveInt = 5000
    test_subset: PositiveInt = 2000
    experts: PositiveInt = 5
    expert_epochs: PositiveInt = 10
    syn_steps: PositiveInt = 20
    match_epochs: PositiveInt = 2
    max_start_epoch: PositiveInt | None = None  # null: 5 at IPC >= 10, 2 at IPC 1 (scripts/cpu-condense.sh)
    iterations: PositiveInt = 200
    lr_img: PositiveFloat = 1000.0
    lr_lr: NonNegFloat | None = None  # null: 1e-5 at IPC >= 10, 1e-7 at IPC 1 (the papers' settings)
    lr_teacher: PositiveFloat = 0.01
    lr_img_dm: PositiveFloat = 1.0  # DM's image learning rate (main_DM.py's and kdkit's default)
    batch_real: PositiveInt = 64  # DM's real images per class per iteration
    eval_epochs: PositiveInt = 300
    eval_nets: PositiveInt = 3
    seed: int = 0
    threads: PositiveInt | None = None
    work_dir: str = str(REPO / ".cache" / "condense-reference")

    def validate(self, at: str) -> None:
        self.ipcs = int_list(self.ipcs, f"{at}ipcs")
        if self.width not in (32, 64, 128, 256):
            raise ConfigError(f"{at}width={self.width} is not allowed: the reference code builds ConvNet-3 of "
                              "width 32, 64, 128 or 256 (ConvNetW<width>)")
        self.methods = name_list(self.methods, f"{at}methods (methods with a reference runner)", list(REPOSITORIES))


def run_condense_reference(settings: list[str] | None = None) -> Path:
    opts = bench_options(CondenseReferenceBench, list(settings or []))
    base = refs_dir().parent
    for method in opts.methods:
        folder, name, entry = REPOSITORIES[method]
        if not (base / folder / entry).is_file():
            raise ConfigError(f"no reference code in {base / folder}: clone {name} there (git-ignored, never "
                              "committed)")
    path = None
    for method in opts.methods:
        folder, name, _ = REPOSITORIES[method]
        for ipc in opts.ipcs:
            spec = {k: v for k, v in asdict(opts).items() if k not in ("ipcs", "methods")}
            spec.update(method=method, ipc=ipc, refs=str(base / folder),
                        work_dir=str(Path(opts.work_dir) / method),
                        max_start_epoch=opts.max_start_epoch or (2 if ipc == 1 else 5),
                        lr_lr=opts.lr_lr if opts.lr_lr is not None else (1e-7 if ipc == 1 else 1e-5))
            got, err = run_worker("kdkit.bench.condense_reference_worker", spec)
            if got is None:
                raise RuntimeError(f"the {name} run failed (IPC {ipc}): {err}")
            keys = (("width", "train_subset", "test_subset", "iterations", "eval_epochs", "eval_nets", "seed")
                    + (("batch_real", "lr_img_dm") if method == "dm" else
                       ("experts", "expert_epochs", "syn_steps", "match_epochs", "max_start_epoch", "lr_img",
                        "lr_lr")))
            path = write_result(KIND, {"method": method, "ipc": ipc, "implementation": name, **got,
                                       "settings": {k: spec[k] for k in keys}})
            print(f"wrote {path}: {method} IPC {ipc} {got['acc_mean']:.1f} ± {got['acc_std']:.1f}", flush=True)
    write_table()
    return path


__all__ = ["run_condense_reference", "KIND"]
