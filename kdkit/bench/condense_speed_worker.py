"""One `kdkit bench condense-speed` measurement in a process of its own: `python -m
kdkit.bench.condense_speed_worker '<json spec>'` prints one JSON line {seconds, all_seconds, peak_bytes}.

The reference loop below is `distill.py`'s inner loop as published (flat student parameters through its
`ReparamModule`, `autograd.grad(create_graph=True)` per step, the normalised parameter distance), run on the
reference's own `networks.ConvNet`, imported from the local reference copy.
"""
from __future__ import annotations

import json
import sys
import time
import types

import torch
import torch.nn.functional as F

from .memory import peak_since, start_peak


def _measure(step, repeats: int, cuda: bool) -> dict:
    """Best of `repeats` timed calls after a warm-up (which compiles); peak memory over the last timed call."""
    step()
    times, peak = [], 0
    for r in range(repeats):
        last = r == repeats - 1
        if cuda:
            torch.cuda.synchronize()
            if last:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
        elif last:
            base = start_peak()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if last:
            peak = torch.cuda.max_memory_allocated() - base if cuda else peak_since(base)
    return {"seconds": min(times), "all_seconds": times, "peak_bytes": int(peak) if peak == peak else None}


def _reference_modules(refs: str):
    sys.path.insert(0, refs)
    sys.modules.setdefault("kornia", types.ModuleType("kornia"))  # utils.py imports it for ZCA only
    import networks
    import reparam_module

    return networks, reparam_module


def _problem(ipc: int, dev):
    torch.manual_seed(0)
    images = torch.randn(10 * ipc, 3, 32, 32, device=dev)
    labels = torch.arange(10, device=dev).repeat_interleave(ipc)
    return images, labels


def reference_tm(spec: dict, dev):
    networks, reparam_module = _reference_modules(spec["refs"])
    net = networks.ConvNet(channel=3, num_classes=10, net_width=spec["width"], net_depth=3, net_act="relu",
                           net_norm="instancenorm", net_pooling="avgpooling", im_size=(32, 32)).to(dev)
    num_params = sum(p.numel() for p in net.parameters())
    start = torch.cat([p.detach().reshape(-1) for p in net.parameters()])  # before ReparamModule takes them
    student = reparam_module.ReparamModule(net)
    student.train()
    target = start + 0.01 * torch.randn_like(start)
    image_syn, label_syn = _problem(spec["ipc"], dev)
    image_syn.requires_grad_(True)
    syn_lr = torch.tensor(0.01, device=dev, requires_grad=True)
    batch_syn = image_syn.shape[0]

    def step():
        student_params = [start.clone().requires_grad_(True)]
        indices_chunks = []
        for _ in range(spec["syn_steps"]):
            if not indices_chunks:
                indices_chunks = list(torch.split(torch.randperm(len(image_syn)), batch_syn))
            these = indices_chunks.pop()
            out = student(image_syn[these], flat_param=student_params[-1])
            ce = F.cross_entropy(out, label_syn[these])
            grad = torch.autograd.grad(ce, student_params[-1], create_graph=True)[0]
            student_params.append(student_params[-1] - syn_lr * grad)
        loss = F.mse_loss(student_params[-1], target, reduction="sum") / num_params
        loss = loss / (F.mse_loss(start, target, reduction="sum") / num_params)
        image_syn.grad = syn_lr.grad = None
        loss.backward()

    return step


def kdkit_tm(spec: dict, dev):
    from ..condense.convnet_functional import FlatConvNet, make_convnet
    from ..condense.tm_step import StepFunctions
    from ..condense.trajectory import constant_memory_grads, make_plan, unrolled_matching_loss

    impl = spec["impl"]
    net = FlatConvNet(make_convnet(10, width=spec["width"]).to(dev))
    fns = StepFunctions(net, compiled=impl.endswith("compiled"))
    start = net.flatten()
    target = start + 0.01 * torch.randn_like(start)
    images, labels = _problem(spec["ipc"], dev)
    lr = torch.tensor(0.01, device=dev, requires_grad=True)
    g = torch.Generator().manual_seed(0)

    def step():
        plan = make_plan(images.shape[0], spec["syn_steps"], None, g)
        if "unrolled" in impl:
            x = images.clone().requires_grad_(True)
            lr.grad = None
            unrolled_matching_loss(net, start, target, x, labels, lr, plan, "none", fns).backward()
        else:
            constant_memory_grads(net, start, target, images, labels, lr, plan, "none", fns)

    return step


def expert_epoch(spec: dict, dev):
    """One epoch of 20 batches of 256 with DSA, SGD lr 0.01 (buffer.py's defaults), on random CIFAR-shaped data."""
    torch.manual_seed(0)
    images = torch.randn(20 * 256, 3, 32, 32, device=dev)
    labels = torch.randint(0, 10, (20 * 256,), device=dev)
    if spec["impl"] == "expert-reference":
        networks, _ = _reference_modules(spec["refs"])
        import utils

        net = networks.ConvNet(channel=3, num_classes=10, net_width=spec["width"], net_depth=3, net_act="relu",
                               net_norm="instancenorm", net_pooling="avgpooling", im_size=(32, 32)).to(dev)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0, weight_decay=0)
        args = types.SimpleNamespace(device=dev, dsa=True, dsa_param=utils.ParamDiffAug(), dataset="CIFAR10",
                                     dsa_strategy="color_crop_cutout_flip_scale_rotate")
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=256,
                                             shuffle=True, num_workers=0)
        crit = torch.nn.CrossEntropyLoss().to(dev)
        return lambda: utils.epoch("train", dataloader=loader, net=net, optimizer=opt, criterion=crit, args=args,
                                   aug=True)
    from ..condense.image_data import ImageSplit
    from ..condense.experts import ExpertTrainer

    split = ImageSplit(images, labels, 10, [str(c) for c in range(10)], (0.0,) * 3, (1.0,) * 3)
    trainer = ExpertTrainer(split, width=spec["width"], seed=0, compiled=spec["impl"].endswith("compiled"))
    return trainer.epoch


def main() -> None:
    spec = json.loads(sys.argv[1])
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec["impl"].startswith("expert"):
        step = expert_epoch(spec, dev)
    else:
        step = reference_tm(spec, dev) if spec["impl"] == "reference" else kdkit_tm(spec, dev)
    out = _measure(step, spec["repeats"], dev.type == "cuda")
    print(json.dumps({**out, "device": str(dev), "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
