"""Recipe -> models, losses, data -> Distiller: what `kdkit train` and `kdkit distill` run for `task: classify`.

`check_recipe` applies every rule that needs no data and no model (the CLI calls it before any work, and
`--dry-run` runs the same); `build_distiller` then loads the data and builds the models.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

from .. import checkpoint as ckpt
from ..config import ConfigError, Recipe, TeacherConfig
from ..data import load_dataset_by_name
from ..data.subsets import balanced_subset
from ..errors import CheckpointError, KdkitError
from ..losses import LOSSES
from ..method import build_method
from ..models import CachedTeacher, Teacher, build_model, check_model
from ..registry import DATASETS
from ..run import run_folder, seed_everything
from .accelerated import check_resume, use_cpu
from .distiller import Distiller, check_loss_teachers

Mode = Literal["train", "distill"]


def _needs_teacher(entry: dict, name: str) -> bool:
    return getattr(LOSSES.get(entry.get("type", name)), "needs_teacher", True)


def check_mode(recipe: Recipe, mode: Mode) -> None:
    """`train` has no teacher (teachers, baselines, self-distillation losses such as PS-KD); `distill` has
    distillation losses and a teacher (or several, or a jointly trained peer) when any of them needs one. Fail
    before any work."""
    t = recipe.teacher
    has_teacher = bool(t.model or t.checkpoint or t.cache or recipe.teachers)
    losses = {k: v for k, v in recipe.losses.items() if v is not None}
    need = sorted(k for k, v in losses.items() if _needs_teacher(v, k))
    if not losses and not recipe.ce_weight:
        raise ConfigError("nothing to train: ce_weight=0 and no losses; set ce_weight > 0 or add a loss")
    if mode == "train" and (has_teacher or need or recipe.peer):
        what = "teacher" if has_teacher else "peer" if recipe.peer else "losses " + ", ".join(need)
        raise ConfigError("`kdkit train` trains without a teacher (teachers and no-teacher baselines); this recipe "
                          f"sets {what}: use `kdkit distill`, or override teacher.model=null teacher.checkpoint=null "
                          "losses={}")
    if mode == "distill":
        if not losses:
            raise ConfigError(f"`kdkit distill` needs at least one loss, e.g. losses.kd.weight=0.9; "
                              f"choices: {', '.join(LOSSES.names())}")
        if recipe.peer and has_teacher:
            raise ConfigError("a recipe has either a frozen teacher (teacher/teachers) or a jointly trained peer "
                              "(peer), not both: the peer is what the online losses (dml, bdkd) learn from")
        if need and not has_teacher and not recipe.peer:
            raise ConfigError(f"losses {', '.join(need)} need a teacher: set teacher.checkpoint=PATH (a run folder or "
                              "model.safetensors from `kdkit train`) or teacher.cache=PATH (stored logits)")
        if (t.model or t.checkpoint or t.cache) and recipe.teachers:
            raise ConfigError("set either teacher (one) or teachers (a list), not both")
        for i, tc in enumerate([t] if not recipe.teachers else recipe.teachers):
            if (tc.model or tc.checkpoint or tc.cache) and not tc.cache and not tc.checkpoint:
                where = "teacher" if not recipe.teachers else f"teachers[{i}]"
                raise ConfigError(f"{where}.model={tc.model} has no weights: set {where}.checkpoint=PATH (a randomly "
                                  "initialised teacher teaches nothing)")


def model_file(path: str | Path) -> Path:
    """A run folder or a weights file -> the weights file."""
    p = Path(path)
    return p / "model.safetensors" if p.is_dir() else p


def teacher_architecture(t: TeacherConfig, key: str = "teacher") -> tuple[str, dict]:
    """(model name, options) of a teacher checkpoint, read from the file's header (no tensor is loaded); refuses
    a corrupt file, one without its architecture, or one made for another model than `teacher.model`."""
    weights = model_file(t.checkpoint)
    meta = ckpt.read_metadata(weights)
    name = t.model or meta.get("model")
    if not name:
        raise ConfigError(f"{key}.model is not set and {weights} does not record its architecture")
    if meta.get("model", name) != name:
        raise CheckpointError(f"checkpoint {weights} holds model={meta['model']}, but the recipe asks for {name} "
                              f"(set {key}.model={meta['model']} or leave {key}.model unset)")
    return name, t.options or json.loads(meta.get("options", "{}"))


def build_teacher(recipe: Recipe | TeacherConfig, num_classes: int):
    """A frozen `Teacher` (or `CachedTeacher`) from a recipe's `teacher` or from one `TeacherConfig`."""
    t = recipe.teacher if isinstance(recipe, Recipe) else recipe
    if t.cache:
        return CachedTeacher.load(t.cache)
    name, options = teacher_architecture(t)
    model = build_model(name, num_classes=num_classes, **options)
    ckpt.load_model(model, model_file(t.checkpoint), expect={"model": name, "num_classes": num_classes})
    return Teacher(model)


def build_peer(recipe: Recipe, num_classes: int):
    """The jointly trained peer network (online distillation), optionally from a checkpoint."""
    p = recipe.peer
    model = build_model(p.model, num_classes=num_classes, **p.options)
    if p.checkpoint:
        ckpt.load_model(model, model_file(p.checkpoint))
    return model


def build_losses(recipe: Recipe, run: dict | None = None) -> dict:
    """Loss modules with their weights. Options a loss accepts but the recipe leaves unset default to the
    run's own values (`run`: epochs, num_samples, num_classes), so per-sample state and schedules fit the run."""
    from ..config import loss_params

    out = {}
    for name, entry in recipe.losses.items():
        if entry is None:
            continue
        kind = entry.get("type", name)
        opts = {k: v for k, v in entry.items() if k not in ("type", "weight")}
        accepted = loss_params(LOSSES.get(kind))
        opts |= {k: v for k, v in (run or {}).items() if k in accepted and k not in opts}
        try:
            out[name] = (float(entry.get("weight", 1.0)), LOSSES.build(kind, **opts))
        except KdkitError:
            raise
        except (ValueError, TypeError) as e:  # a constructor's own cross-option rule
            raise ConfigError(f"losses.{name}: {e}") from e
    return out


def check_models(recipe: Recipe) -> None:
    """Model names and options (`kdkit.models.check_model`), and every weights file the recipe names present and
    readable (the safetensors header only)."""
    named = [("student", recipe.student)] + ([("peer", recipe.peer)] if recipe.peer else [])
    teachers = [(f"teachers.{i}", t) for i, t in enumerate(recipe.teachers)] or [("teacher", recipe.teacher)]
    for key, m in named:
        check_model(m.model, m.options, key)
        if m.checkpoint:
            ckpt.read_metadata(model_file(m.checkpoint))
    for key, t in teachers:
        if t.cache:
            ckpt.read_metadata(Path(t.cache))
        elif t.checkpoint:
            check_model(*teacher_architecture(t, key), key)


def check_recipe(recipe: Recipe, mode: Mode) -> None:
    """Every rule of a classifier recipe that needs no data or model (what `--dry-run` checks too): the mode,
    the dataset name, models and weights files, the losses built with their own options and matched with the
    teachers, and the resume rule."""
    check_mode(recipe, mode)
    DATASETS.get(recipe.data.name.strip().lower())  # an unknown name is refused with the choices
    check_models(recipe)
    losses = {n: loss for n, (_, loss) in build_losses(recipe, {"epochs": recipe.trainer.epochs}).items()}
    t = recipe.teacher
    teachers = len(recipe.teachers) or int(bool(t.checkpoint or t.cache))
    check_loss_teachers(losses, teachers=teachers, many=bool(recipe.teachers), peer=recipe.peer is not None,
                        cached=bool(t.cache) or any(tc.cache for tc in recipe.teachers))
    check_resume(recipe, run_folder(recipe.output_dir, recipe.name, "run"))


def run_name(recipe: Recipe, recipe_name: str | None) -> str:
    """The run folder's name, the same on every process of a multi-process launch."""
    if recipe.name:
        return recipe.name
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    name = [f"{recipe_name or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"]
    if PartialState(cpu=use_cpu(recipe)).num_processes > 1:
        broadcast_object_list(name)
    return name[0]


def build_distiller(recipe: Recipe, mode: Mode, recipe_name: str | None = None, on_step=None) -> Distiller:
    """Everything a run needs, checked then built: data, student, teacher, losses, run folder."""
    from accelerate import PartialState

    check_recipe(recipe, mode)
    state = PartialState(cpu=use_cpu(recipe))
    run_dir = Path(recipe.output_dir) / run_name(recipe, recipe_name)
    with state.main_process_first():
        train = load_dataset_by_name(recipe.data.name, "train")
        test = load_dataset_by_name(recipe.data.name, "test")
    indices = None
    if recipe.data.train_per_class is not None:
        indices = balanced_subset(train.labels, recipe.data.train_per_class, seed=recipe.trainer.seed)
    num_classes = len(train.classes)
    seed_everything(recipe.trainer.seed)  # the student's (and the losses') initial weights
    student = build_model(recipe.student.model, num_classes=num_classes, **recipe.student.options)
    if recipe.student.checkpoint:
        ckpt.load_model(student, model_file(recipe.student.checkpoint))
    if recipe.teachers:
        teacher = [build_teacher(t, num_classes) for t in recipe.teachers]
    else:
        teacher = build_teacher(recipe, num_classes) if recipe.teacher.checkpoint or recipe.teacher.cache else None
    peer = build_peer(recipe, num_classes) if recipe.peer else None
    run = {"epochs": recipe.trainer.epochs, "num_samples": len(train.labels), "num_classes": num_classes}
    if recipe.teachers:
        run["num_teachers"] = len(recipe.teachers)
    losses = build_losses(recipe, run)

    def meta(m) -> dict:
        return {"model": m.model, "num_classes": num_classes, "options": json.dumps(m.options),
                "dataset": recipe.data.name}

    ctx = dict(student=student, teacher=teacher, losses=losses, train=train, test=test, cfg=recipe, run_dir=run_dir,
               train_indices=indices, peer=peer, model_meta=meta(recipe.student), on_step=on_step,
               peer_meta=meta(recipe.peer) if peer is not None else None)
    return build_method("distill", "classify", ctx, {})


def run_recipe(recipe: Recipe, mode: Mode, recipe_name: str | None = None):
    """`kdkit train|distill` for a classifier recipe: (run folder, summary); only the main process reports."""
    distiller = build_distiller(recipe, mode, recipe_name)
    summary = distiller.fit()
    return (distiller.run_dir if distiller.accelerator.is_main_process else None), summary
