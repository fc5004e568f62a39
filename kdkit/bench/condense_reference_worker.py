"""Run a reference implementation in this process on kdkit's offline CIFAR-10: MTT (GeorgeCazenavette/
mtt-distillation's `buffer.py`, then `distill.py`) or DM (VICO-UoE/DatasetCondensation's `main_DM.py`).

`python -m kdkit.bench.condense_reference_worker '<json spec>'` (from `kdkit bench condense-reference`). The
reference is imported from its local, never-committed copy and run unmodified, with four things around it:
- `utils.get_dataset` returns kdkit's class-balanced subsets (`load_image_splits`, same normalisation), so both
  implementations see the very same images;
- `wandb` is a stub that keeps `config` (distill.py rebuilds its arguments from `wandb.config._items`);
- `kornia` (imported by utils.py for ZCA only) is an empty module;
- `Tensor.cuda` returns the tensor on a CPU machine (distill.py moves the images it saves with `.cuda()`), and
  `Tensor.cpu` of a CPU tensor returns a copy, as it does from the GPU the code was written for: buffer.py
  snapshots each epoch's parameters with `p.detach().cpu()`, which on a CPU is the live parameter itself, so
  every snapshot would be the final weights (start = target, a 0/0 matching loss);
- `t[:] = t[0]` (the Siamese augmentation of DatasetCondensation's utils.py, written for torch 1.x) clones the
  right-hand side first, as torch 1.x's copy did; torch 2 refuses the overlapping write;
- main_DM.py evaluates every 2,000 iterations from 0, so a shorter run would only evaluate its initial images: its
  schedule is given the run's length (evaluations at iteration 0 and at the last), the one change to its loop.
Prints one JSON line: the accuracies distill.py printed after its last iteration, and the seconds each part took.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
import types
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import torch


def _stub_modules() -> None:
    sys.modules.setdefault("kornia", types.ModuleType("kornia"))
    wandb = types.ModuleType("wandb")

    class _Config:
        def __init__(self):
            self._items = {}

    wandb.config = _Config()
    wandb.run = types.SimpleNamespace(name="kdkit-reference")

    def init(config=None, **_):
        wandb.config._items = dict(vars(config)) if config is not None else {}

    wandb.init = init
    wandb.log = lambda *a, **k: None
    wandb.finish = lambda *a, **k: None
    wandb.Image = lambda *a, **k: None
    wandb.Histogram = lambda *a, **k: None
    sys.modules["wandb"] = wandb
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self
        to_cpu = torch.Tensor.cpu
        torch.Tensor.cpu = lambda self, *a, **k: self.clone() if self.device.type == "cpu" else to_cpu(self, *a, **k)
    setitem = torch.Tensor.__setitem__

    def setitem_copying_overlaps(self, index, value):
        if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() == self.untyped_storage().data_ptr():
            value = value.clone()
        return setitem(self, index, value)

    torch.Tensor.__setitem__ = setitem_copying_overlaps


def _splits(spec: dict):
    from ..condense.image_data import load_image_splits

    return load_image_splits("cifar10", train_subset=spec["train_subset"], test_subset=spec["test_subset"], zca=False,
                             seed=spec["seed"])


def _patch_data(utils, spec: dict) -> None:
    train, test = _splits(spec)
    dst_train = torch.utils.data.TensorDataset(train.images, train.labels)
    dst_test = torch.utils.data.TensorDataset(test.images, test.labels)

    def get_dataset(dataset, data_path, batch_size=1, subset="imagenette", args=None):
        testloader = torch.utils.data.DataLoader(dst_test, batch_size=256, shuffle=False, num_workers=0)
        class_map = {i: i for i in range(10)}
        return (3, (32, 32), 10, list(train.classes), list(train.mean), list(train.std), dst_train, dst_test,
                testloader, None, class_map, class_map)

    utils.get_dataset = get_dataset


def _parse(module, argv: list[str]):
    saved = sys.argv
    sys.argv = [module.__file__] + argv
    try:
        src = Path(module.__file__).read_text()
        parser_src = src[src.index("if __name__ == '__main__':"):]
        ns: dict = {"argparse": __import__("argparse")}
        exec(parser_src.replace("if __name__ == '__main__':", "if True:").replace("main(args)", "ARGS = args"),
             {**vars(module), **ns}, ns)
        return ns["ARGS"]
    finally:
        sys.argv = saved


def _evaluations(text: str) -> dict:
    evals = re.findall(r"Evaluate (\d+) random \S+, mean = ([0-9.]+) std = ([0-9.]+)", text)
    if not evals:
        raise SystemExit("the reference printed no evaluation")
    n, mean, std = evals[-1]
    accs = [float(a) for a in re.findall(r"test acc = ([0-9.]+)", text)][-int(n):]
    eval_seconds = sum(int(t) for t in re.findall(r"train time = (\d+) s", text))  # its evaluations, all of them
    return {"acc_mean": 100 * float(mean), "acc_std": 100 * float(std), "accs": accs,
            "initial_mean": 100 * float(evals[0][1]), "eval_seconds": eval_seconds}


def run_dm(spec: dict) -> dict:
    """main_DM.py (its own argparse, one experiment) with kdkit's data and the run's budget."""
    import numpy as np

    import utils

    train, test = _splits(spec)
    dst_train = torch.utils.data.TensorDataset(train.images, train.labels)
    dst_test = torch.utils.data.TensorDataset(test.images, test.labels)

    def get_dataset(dataset, data_path):
        testloader = torch.utils.data.DataLoader(dst_test, batch_size=256, shuffle=False, num_workers=0)
        return 3, (32, 32), 10, list(train.classes), list(train.mean), list(train.std), dst_train, dst_test, testloader

    utils.get_dataset = get_dataset
    import main_DM

    main_DM.get_dataset = get_dataset
    iterations = spec["iterations"]
    schedule = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    schedule.arange = lambda *a, **k: np.array([0, iterations]) if a[:3] == (0, iterations + 1, 2000) \
        else np.arange(*a, **k)
    main_DM.np = schedule
    model = f"ConvNetW{spec['width']}" if spec["width"] != 128 else "ConvNet"
    argv = ["--dataset", "CIFAR10", "--model", model, "--ipc", str(spec["ipc"]), "--num_exp", "1",
            "--num_eval", str(spec["eval_nets"]), "--epoch_eval_train", str(spec["eval_epochs"]),
            "--Iteration", str(iterations), "--lr_img", str(spec["lr_img_dm"]), "--batch_real",
            str(spec["batch_real"]), "--init", "real", "--data_path", "data", "--save_path", "result"]
    saved, sys.argv = sys.argv, ["main_DM.py"] + argv
    log = StringIO()
    t0 = time.perf_counter()
    try:
        with redirect_stdout(log):
            main_DM.main()
    finally:
        sys.argv = saved
    out = {"model": model, "distill_seconds": time.perf_counter() - t0}
    Path(f"dm-ipc{spec['ipc']}.log").write_text(log.getvalue())
    return {**out, **_evaluations(log.getvalue())}


def main() -> None:
    spec = json.loads(sys.argv[1])
    refs = spec["refs"]
    sys.path.insert(0, refs)
    _stub_modules()
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    work = Path(spec["work_dir"])
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    torch.manual_seed(spec["seed"])
    if spec["method"] == "dm":
        print(json.dumps(run_dm(spec)))
        return
    import utils

    _patch_data(utils, spec)
    import buffer
    import distill

    buffer.get_dataset = distill.get_dataset = utils.get_dataset
    model = f"ConvNetW{spec['width']}" if spec["width"] != 128 else "ConvNet"
    out: dict = {"model": model}
    buffers = work / "buffers"
    expert_dir = buffers / "CIFAR10_NO_ZCA" / model
    if not (expert_dir / "replay_buffer_0.pt").is_file():
        args = _parse(buffer, ["--dataset", "CIFAR10", "--model", model, "--num_experts", str(spec["experts"]),
                               "--train_epochs", str(spec["expert_epochs"]), "--buffer_path", str(buffers),
                               "--save_interval", str(spec["experts"])])
        t0 = time.perf_counter()
        with redirect_stdout(StringIO()):
            buffer.main(args)
        out["expert_seconds"] = time.perf_counter() - t0
    args = _parse(distill, ["--dataset", "CIFAR10", "--model", model, "--ipc", str(spec["ipc"]),
                            "--syn_steps", str(spec["syn_steps"]), "--expert_epochs", str(spec["match_epochs"]),
                            "--max_start_epoch", str(spec["max_start_epoch"]), "--lr_img", str(spec["lr_img"]),
                            "--lr_lr", str(spec["lr_lr"]), "--lr_teacher", str(spec["lr_teacher"]),
                            "--Iteration", str(spec["iterations"]), "--eval_it", str(spec["iterations"]),
                            "--num_eval", str(spec["eval_nets"]), "--epoch_eval_train", str(spec["eval_epochs"]),
                            "--buffer_path", str(buffers), "--pix_init", "real"])
    log = StringIO()
    t0 = time.perf_counter()
    with redirect_stdout(log):
        distill.main(args)
    out["distill_seconds"] = time.perf_counter() - t0  # includes its evaluations at iteration 0 and at the end
    Path(f"distill-ipc{spec['ipc']}.log").write_text(log.getvalue())
    print(json.dumps({**out, **_evaluations(log.getvalue())}))


if __name__ == "__main__":
    main()
