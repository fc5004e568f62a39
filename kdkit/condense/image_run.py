"""One image-condensation run: condense, checkpoint, resume, evaluate, write the run folder.

`kdkit condense cifar10 --ipc 10 [--method dm|mtt|datm|cvdd] [--eval convnet|resnet18] [key=value ...]`.

The run folder `runs/condense-<dataset>-<method>-ipc<k>[-<name>]/` holds
- `config.json`: every setting;
- `synthetic.safetensors`: `images` (normalised space), `labels` (class ids or learned soft labels), `lr`
  (the learned student learning rate when the method learns one);
- `grid.png`: the synthetic images, one row per class;
- `eval.json`: the evaluation (protocol, mean ± std over fresh networks, image and label bytes) and, with
  `baseline=true`, the same protocol on `ipc` random real images per class (same seeds);
- `curves.json` / `curves.png`: the matching loss per iteration;
- CV-DD only: `crop_labels.safetensors` (FKD crop-level committee soft labels, one set of crops per student
  epoch) and `crop_labels_random_real.safetensors` (the same committee relabelling of the random real images);
- `checkpoint.pt`: the method's state every `checkpoint_every` iterations; a rerun with the same settings
  resumes from it (`resume=false` starts over). Iteration randomness is derived from (seed, iteration), so a
  resumed run reproduces the uninterrupted one.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from ..errors import ConfigError
from .augment import DEFAULT_STRATEGY, parse_strategy
from .image_data import ImageSplit, load_image_splits, random_real
from .image_eval import PROTOCOLS, EvalSettings, evaluate_synthetic

IMAGE_METHODS = ("dm", "mtt", "datm", "cvdd")
DEFAULT_METHOD = "dm"  # needs no expert trajectories, so it runs anywhere; mtt/datm train experts first


@dataclass
class ImageCondenseConfig:
    dataset: str = "cifar10"
    method: str = DEFAULT_METHOD
    ipc: int = 10
    eval: str | None = None             # None: resnet18 (relabel protocol) for cvdd, convnet for the others
    iterations: int | None = None       # None: the paper's default for the method and IPC
    seed: int = 0
    width: int = 128                     # ConvNet width (128 in the papers; smaller for CPU smoke runs)
    dsa_strategy: str = DEFAULT_STRATEGY
    zca: bool | None = None              # None: the paper's choice (MTT/DATM per IPC; DM: off)
    train_subset: int | None = None      # class-balanced subset of the training set (CPU-sized runs)
    test_subset: int | None = None
    # DM
    lr_img: float | None = None
    batch_real: int | None = None
    # evaluation
    eval_epochs: int = 1000
    eval_nets: int = 5
    eval_lr: float | None = None         # None: the learned lr when there is one, else 0.01
    baseline: bool = True                # also evaluate ipc random real images per class
    # trajectory matching (mtt / datm); None = paper defaults per IPC (see trajectory.PAPER_DEFAULTS)
    experts: int | None = None
    expert_epochs: int | None = None     # epochs each expert trains (stored per-epoch snapshots)
    syn_steps: int | None = None         # N
    match_epochs: int | None = None      # M
    max_start_epoch: int | None = None
    lr_lr: float | None = None
    lr_teacher: float | None = None
    batch_syn: int | None = None
    tesla: bool = False                  # constant-memory gradient
    experts_dir: str | None = None
    # committee voting (cvdd); None = paper defaults (committee_voting.PAPER_DEFAULTS), or CPU_PRESET with preset=cpu.
    # `iterations` is per recovered batch (one image per class) for cvdd; the run does ipc x iterations steps.
    preset: str | None = None            # "cpu": a tiny committee and short runs (minutes on a 2-core CPU)
    members: str | None = None           # comma-separated committee (committee.member_model names)
    member_epochs: int | None = None
    voters: int | None = None            # members per recovered batch
    recover_lr: float | None = None
    r_bn: float | None = None
    first_bn_multiplier: float | None = None
    jitter: int | None = None
    recover_temperature: float | None = None
    relabel_temperature: float | None = None
    patch_factor: int | None = None
    patch_difficulty: str | None = None
    patch_candidates: int | None = None
    min_scale: float | None = None
    label_batch: int | None = None
    bn_batch: int | None = None
    cutmix: bool | None = None
    label_topk: int | None = None
    eval_student: str | None = None      # protocol (b)'s network (None: ResNet-18)
    eval_temperature: float | None = None
    eval_lr_adamw: float | None = None
    # run folder
    checkpoint_every: int = 100
    output_dir: str = "runs"
    name: str | None = None
    resume: bool = True
    progress: bool = True
    device: str | None = None            # None: cuda when available, else cpu

    def run_dir(self) -> Path:
        tag = f"condense-{self.dataset}-{self.method}-ipc{self.ipc}" + (f"-{self.name}" if self.name else "")
        return Path(self.output_dir) / tag

    def eval_settings(self) -> EvalSettings:
        es = EvalSettings(protocol=self.eval, epochs=self.eval_epochs, nets=self.eval_nets, lr=self.eval_lr,
                          dsa_strategy=self.dsa_strategy, width=self.width, seed=self.seed, student=self.eval_student)
        if self.eval_temperature is not None:
            es.temperature = self.eval_temperature
        if self.eval_lr_adamw is not None:
            es.adamw_lr = self.eval_lr_adamw
        return es


def _parse_value(text: str, current):
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def build_image_config(dataset: str, method: str, settings: list[str] | None = None, **options) -> ImageCondenseConfig:
    """Config from the CLI: dataset, method, `key=value` settings and options (ipc, eval)."""
    names = {f.name for f in fields(ImageCondenseConfig)}
    values: dict = {"dataset": dataset, "method": method}
    for item in settings or []:
        if "=" not in item:
            raise ConfigError(f"setting '{item}' is not key=value; keys: {', '.join(sorted(names))}")
        key, raw = item.split("=", 1)
        if key not in names:
            raise ConfigError(f"unknown setting '{key}' for image condensation; keys: {', '.join(sorted(names))}")
        values[key] = _parse_value(raw, None)
    for key, value in options.items():
        if value is not None:
            if key not in names:
                raise ConfigError(f"unknown option '{key}' for image condensation")
            values[key] = value
    return check_image_config(ImageCondenseConfig(**values))


def check_image_config(cfg: ImageCondenseConfig) -> ImageCondenseConfig:
    if not isinstance(cfg.ipc, int) or isinstance(cfg.ipc, bool) or cfg.ipc <= 0:
        raise ConfigError(f"ipc (images per class) must be a positive integer such as 1, 10 or 50, got {cfg.ipc!r}")
    if cfg.method not in IMAGE_METHODS:
        raise ConfigError(f"unknown image condensation method '{cfg.method}'; choices: {', '.join(IMAGE_METHODS)}")
    if cfg.method == "cvdd":
        _apply_cvdd_preset(cfg)
    if cfg.eval is None:
        cfg.eval = "resnet18" if cfg.method == "cvdd" else "convnet"
    if cfg.eval not in PROTOCOLS:
        raise ConfigError(f"unknown evaluation protocol '{cfg.eval}'; choices: {', '.join(PROTOCOLS)}")
    if cfg.iterations is not None and cfg.iterations < 0:
        raise ConfigError(f"iterations must be >= 0, got {cfg.iterations}")
    if cfg.dsa_strategy != "none":
        parse_strategy(cfg.dsa_strategy)
    if cfg.zca is None:
        if cfg.method in ("mtt", "datm"):
            from .trajectory import paper_defaults

            cfg.zca = bool(paper_defaults(cfg.method, cfg.ipc)["zca"])
        else:
            cfg.zca = False
    if cfg.checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every must be >= 1, got {cfg.checkpoint_every}")
    return cfg


def _apply_cvdd_preset(cfg: ImageCondenseConfig) -> None:
    """Check the CV-DD settings; with `preset=cpu` fill every setting left unset from the CPU preset (the run's
    own fields too: train/test subsets, evaluation epochs/nets/student), so `config.json` says what ran."""
    from .committee import parse_members
    from .committee_voting import CPU_PRESET, DIFFICULTIES

    if cfg.preset not in (None, "cpu"):
        raise ConfigError(f"unknown preset '{cfg.preset}' for cvdd; choices: cpu")
    if cfg.preset == "cpu":
        defaults = {f.name: f.default for f in fields(ImageCondenseConfig)}
        for key, value in CPU_PRESET.items():
            if getattr(cfg, key) == defaults[key]:
                setattr(cfg, key, value)
    if cfg.members is not None:
        parse_members(cfg.members)
    if cfg.patch_difficulty is not None and cfg.patch_difficulty not in DIFFICULTIES:
        raise ConfigError(f"patch_difficulty must be one of {', '.join(DIFFICULTIES)}, got '{cfg.patch_difficulty}'")
    for key in ("voters", "member_epochs", "label_batch", "bn_batch", "patch_factor", "patch_candidates"):
        v = getattr(cfg, key)
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ConfigError(f"{key} must be a positive integer, got {v!r}")


def build_method(cfg: ImageCondenseConfig, train: ImageSplit, run_dir: Path):
    """The method object (step / synthetic / state_dict / load_state_dict) and its iteration count."""
    if cfg.method == "cvdd":
        from .committee_voting import build_committee_voting

        return build_committee_voting(cfg, train, run_dir)
    x0, y0 = random_real(train, cfg.ipc, cfg.seed)
    if cfg.method == "dm":
        from .distribution_matching import PAPER_DEFAULTS, DistributionMatching

        d = PAPER_DEFAULTS.get(cfg.ipc, PAPER_DEFAULTS[10])
        method = DistributionMatching(train, x0, y0, lr_img=cfg.lr_img or d["lr_img"], momentum=d["momentum"],
                                      batch_real=cfg.batch_real or d["batch_real"], width=cfg.width,
                                      dsa_strategy=cfg.dsa_strategy, seed=cfg.seed)
        return method, cfg.iterations if cfg.iterations is not None else d["iterations"]
    from .trajectory import build_trajectory_matching

    return build_trajectory_matching(cfg, train, x0, y0, run_dir)


def save_grid(images: torch.Tensor, ipc: int, split: ImageSplit, path: Path, zca: bool) -> None:
    """PNG of the synthetic set, one row per class (per-image min-max scaled when ZCA-whitened)."""
    from torchvision.utils import save_image

    x = images.detach().float().cpu()
    if zca:
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-8)
    else:
        x = x * torch.tensor(split.std).view(1, -1, 1, 1) + torch.tensor(split.mean).view(1, -1, 1, 1)
    save_image(x.clamp(0, 1), str(path), nrow=ipc, padding=1)


def _save_curves(curves: list[dict], run_dir: Path) -> None:
    (run_dir / "curves.json").write_text(json.dumps(curves))
    if not curves:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([c["it"] for c in curves], [c["loss"] for c in curves])
    ax.set_xlabel("iteration")
    ax.set_ylabel("matching loss")
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=100)
    plt.close(fig)


_RUN_KEYS_IGNORED_ON_RESUME = ("device", "eval", "eval_epochs", "eval_nets", "eval_lr", "baseline", "progress", "resume",
                               "iterations", "checkpoint_every", "eval_student", "eval_temperature", "eval_lr_adamw",
                               "relabel_temperature", "label_batch", "bn_batch", "cutmix", "label_topk")


def save_synthetic(path: Path, syn: dict) -> None:
    from safetensors.torch import save_file

    tensors = {"images": syn["images"].detach().cpu().contiguous(), "labels": syn["labels"].detach().cpu().contiguous()}
    if syn.get("lr") is not None:
        tensors["lr"] = torch.as_tensor(syn["lr"], dtype=torch.float32).reshape(1)
    save_file(tensors, str(path))


def load_synthetic(path) -> dict:
    from safetensors.torch import load_file

    t = load_file(str(path))
    return {"images": t["images"], "labels": t["labels"], "lr": float(t["lr"]) if "lr" in t else None}


def _relabel_and_evaluate(cfg: ImageCondenseConfig, method, syn: dict, train: ImageSplit, test: ImageSplit,
                          run_dir: Path) -> dict:
    """CV-DD's relabel step and protocol (b): committee crop labels for the synthetic set (one set of crops per
    student epoch), students trained on them; beside it the random real images (i) relabelled by the same
    committee the same way and (ii) with hard labels (same crops, CutMix, optimiser), all with the same student
    and epochs."""
    from .committee_voting import relabel
    from .crop_labels import save_crop_labels
    from .image_eval import evaluate_crop_labels

    out: dict = {"committee": [{"name": m.name, "prior": m.prior} for m in method.members],
                 "voter_schedule": [list(v) for v in method.schedule]}
    if cfg.eval_epochs < 1 or cfg.eval_nets < 1:
        return out
    es = cfg.eval_settings()
    t0 = time.time()
    store = relabel(method, syn["images"], cfg.eval_epochs, seed=cfg.seed, progress=cfg.progress)
    out["relabel_seconds"] = time.time() - t0
    save_crop_labels(store, run_dir / "crop_labels.safetensors")
    out["eval"] = evaluate_crop_labels(syn["images"], store, test.images, test.labels, es)
    if cfg.baseline:
        xr, yr = random_real(train, cfg.ipc, cfg.seed)
        store_r = relabel(method, xr, cfg.eval_epochs, seed=cfg.seed, progress=cfg.progress)
        save_crop_labels(store_r, run_dir / "crop_labels_random_real.safetensors")
        out["random_real_relabelled"] = evaluate_crop_labels(xr, store_r, test.images, test.labels, es)
        # hard labels through the very same crops, optimiser and epochs: only the labels differ
        out["random_real"] = evaluate_crop_labels(xr, store_r, test.images, test.labels, es, hard_labels=yr)
    return out


def run_image_condense(cfg: ImageCondenseConfig, splits: tuple[ImageSplit, ImageSplit] | None = None) -> dict:
    """Condense, evaluate and write the run folder; returns the metrics (with `run_dir`)."""
    cfg = check_image_config(cfg)
    run_dir = cfg.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    train, test = splits or load_image_splits(cfg.dataset, cfg.train_subset, cfg.test_subset, cfg.zca, cfg.seed)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for split in (train, test):
        split.images, split.labels = split.images.to(device), split.labels.to(device)
    method, iterations = build_method(cfg, train, run_dir)

    ckpt_path = run_dir / "checkpoint.pt"
    start, curves = 0, []
    if cfg.resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        same = {k: v for k, v in asdict(cfg).items() if k not in _RUN_KEYS_IGNORED_ON_RESUME}
        old = {k: v for k, v in ckpt["config"].items() if k not in _RUN_KEYS_IGNORED_ON_RESUME}
        if same != old:
            diff = sorted(k for k in same if same.get(k) != old.get(k))
            raise ConfigError(f"{run_dir} holds a checkpoint made with different settings ({', '.join(diff)}); "
                              "pass resume=false to start over or name=... for a new run folder")
        method.load_state_dict(ckpt["state"])
        start, curves = int(ckpt["iteration"]), list(ckpt["curves"])
    (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))

    def checkpoint(it: int) -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"config": asdict(cfg), "iteration": it, "state": method.state_dict(), "curves": curves}, tmp)
        tmp.replace(ckpt_path)

    from tqdm import tqdm

    t0 = time.time()
    bar = tqdm(range(start, iterations), initial=start, total=iterations, disable=not cfg.progress,
               desc=f"{cfg.method} ipc={cfg.ipc}")
    for it in bar:
        m = method.step(it)
        curves.append({"it": it, **m})
        bar.set_postfix(loss=f"{m['loss']:.4g}")
        if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == iterations:
            checkpoint(it + 1)
    seconds = time.time() - t0

    syn = method.synthetic()
    save_synthetic(run_dir / "synthetic.safetensors", syn)
    save_grid(syn["images"], cfg.ipc, train, run_dir / "grid.png", cfg.zca)
    _save_curves(curves, run_dir)

    metrics: dict = {"dataset": cfg.dataset, "method": cfg.method, "ipc": cfg.ipc, "iterations": iterations,
                     "condense_seconds": seconds, "run_dir": str(run_dir)}
    if cfg.method == "cvdd":
        metrics.update(_relabel_and_evaluate(cfg, method, syn, train, test, run_dir))
    elif cfg.eval_epochs > 0 and cfg.eval_nets > 0:
        es = cfg.eval_settings()
        metrics["eval"] = evaluate_synthetic(syn["images"], syn["labels"], test.images, test.labels, es, lr=syn.get("lr"))
        if cfg.baseline:
            xr, yr = random_real(train, cfg.ipc, cfg.seed)  # the very images the method started from
            metrics["random_real"] = evaluate_synthetic(xr, yr, test.images, test.labels, es)
    (run_dir / "eval.json").write_text(json.dumps(metrics, indent=1))
    return metrics
