"""Run the reference MTT code (`buffer.py`, then `distill.py`) in this process on kdkit's offline CIFAR-10.

`python -m kdkit.bench.condense_reference_worker '<json spec>'` (from `kdkit bench condense-reference`). The
reference is imported from its local, never-committed copy and run unmodified, with four things around it:
- `utils.get_dataset` returns kdkit's class-balanced subsets (`load_image_splits`, same normalisation), so both
  implementations see the very same images;
- `wandb` is a stub that keeps `config` (distill.py rebuilds its arguments from `wandb.config._items`);
- `kornia` (imported by utils.py for ZCA only) is an empty module;
- `Tensor.cuda` returns the tensor on a CPU machine (distill.py moves the images it saves with `.cuda()`).
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


def _patch_data(utils, spec: dict) -> None:
    from ..condense.image_data import load_image_splits

    train, test = load_image_splits("cifar10", train_subset=spec["train_subset"], test_subset=spec["test_subset"],
                                    zca=False, seed=spec["seed"])
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


def main() -> None:
    spec = json.loads(sys.argv[1])
    refs = spec["refs"]
    sys.path.insert(0, refs)
    _stub_modules()
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    import utils

    _patch_data(utils, spec)
    import buffer
    import distill

    buffer.get_dataset = distill.get_dataset = utils.get_dataset
    work = Path(spec["work_dir"])
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # distill.py writes ./logged_files
    model = f"ConvNetW{spec['width']}" if spec["width"] != 128 else "ConvNet"
    out: dict = {"model": model}
    buffers = work / "buffers"
    expert_dir = buffers / "CIFAR10_NO_ZCA" / model
    torch.manual_seed(spec["seed"])
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
    (work / f"distill-ipc{spec['ipc']}.log").write_text(log.getvalue())
    evals = re.findall(r"Evaluate (\d+) random \S+, mean = ([0-9.]+) std = ([0-9.]+)", log.getvalue())
    if not evals:
        raise SystemExit("distill.py printed no evaluation")
    n, mean, std = evals[-1]
    accs = [float(a) for a in re.findall(r"test acc = ([0-9.]+)", log.getvalue())][-int(n):]
    out.update(acc_mean=100 * float(mean), acc_std=100 * float(std), accs=accs, initial_mean=100 * float(evals[0][1]))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
