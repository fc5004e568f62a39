"""Several LM teachers, some with another tokenizer than the student's: those train through the cross-tokenizer
(ALM) path, one teacher at a time, beside the token-KD teachers.

Token KD (and any mixture of distributions) compares next-token probabilities id by id, so it needs the student's
vocabulary; ALM (`kdkit.llm.cross_tokenizer`, `losses.cross_tokenizer`) compares the likelihoods of aligned text
chunks and needs none. In a `teachers:` run, a teacher whose tokenizer differs from the student's is an "ALM
teacher": it reads whole training texts (cut to llm.block_size tokens on each side, as the single-teacher cross
path), aligned by its own `CrossTokenizerBatcher`, and its term is the recipe's one `cross_tokenizer` loss.

- `mix=route`: texts routed to a same-tokenizer teacher are packed into token blocks and taught by token KD as
  before; texts routed to an ALM teacher stay whole. A step takes its whole batch from one path (the token blocks,
  or one ALM teacher's texts; `RoutedPaths`), in a seeded order that interleaves the paths. So every step's loss is
  exactly one of the two single-path losses (one student forward, one teacher side, one ALM batch over one chunk
  alignment); over an epoch each path's share of the steps is its share of the data, as in a batch that mixed
  them. Summing both paths inside one batch would need two student forwards of different shapes, and a per-batch
  weight that moves with how many items of each kind the batch drew.
- `mix=mean|fixed`: every teacher sees the same texts. The loss is the weighted sum of per-teacher losses: token KD
  against the same-tokenizer teachers' mixture with their share of the weight (`TeacherMix` over them), plus ALM
  against each ALM teacher with its own weight (`TeacherPaths`). One student forward serves both.
- `mix=learned` needs the mixture's gradient through one distribution, so it is refused with an ALM teacher, as
  are a served ALM teacher (a server returns top-k log-probs, not the logits over its own tokens ALM scores) and a
  recipe whose losses do not fit its teachers (`check_cross_teachers`, before any work, from tokenizers alone).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import Recipe
from ..errors import ConfigError


@dataclass
class TeacherPaths:
    """One step's teacher signal over both paths: `token` (a signal, or the same-tokenizer teachers' signals for
    `LMStep.mix`) weighted by `token_share`, and per ALM teacher (term suffix, share, its `CrossTokenizerChunks`, the
    student's chunk features for it). The single-teacher cross path is `cross=[(None, 1.0, chunks, features)]`."""

    token: object = None
    token_share: float = 1.0
    cross: list = field(default_factory=list)


@dataclass
class CrossTeachers:
    """The ALM teachers' data: `batchers` (teacher index -> its aligner with the student's tokenizer); `texts`, the
    whole training texts they read (all of them when mixed; when routed, those routed to ALM teachers, with each
    one's teacher in `owner`); the evaluation text in each one's own tokens (`eval_blocks`), per route when routed
    (`eval_blocks_by_route`); `shares`, every teacher's normalised weight (mixed runs)."""

    batchers: dict
    texts: list[str]
    owner: Tensor | None = None
    eval_blocks: dict = field(default_factory=dict)
    eval_blocks_by_route: dict | None = None
    shares: list[float] | None = None


def teacher_shares(mix: str, weights: list[float], k: int) -> list[float]:
    """Each teacher's share of a mean or fixed mixture (they sum to 1)."""
    if mix == "fixed":
        total = float(sum(weights))
        return [float(w) / total for w in weights]
    return [1.0 / k] * k


def other_tokenizer(teacher_toks: list, student_tok) -> list[int]:
    """The teachers whose tokenizer differs from the student's (they train through ALM)."""
    from .tokenizers import tokenizer_differences

    return [i for i, t in enumerate(teacher_toks) if tokenizer_differences(t, student_tok)]


def check_cross_teachers(recipe: Recipe, teacher_toks: list, student_tok) -> list[int]:
    """`teachers:` against the student's tokenizer (`build.recipe_tokenizers`), before any work: which teachers
    train through ALM, refusing in one line what cannot run (see the module docstring). Returns their indices."""
    from .tokenizers import tokenizer_differences

    mt = recipe.llm.multi_teacher
    alm = other_tokenizer(teacher_toks, student_tok)
    entries = {n: e for n, e in recipe.losses.items() if e is not None}
    cross = [n for n, e in entries.items() if e.get("type", n) == "cross_tokenizer"]
    token = sorted(set(entries) - set(cross))
    same = [i for i in range(len(recipe.teachers)) if i not in alm]
    if not alm:
        if cross:
            raise ConfigError(f"losses.{cross[0]} (cross_tokenizer) is for a teacher with another tokenizer, and every "
                              "teacher shares the student's: drop it (token_kd compares their distributions directly)")
        return alm
    i = alm[0]
    if not cross:
        why = tokenizer_differences(teacher_toks[i], student_tok)[0]
        raise ConfigError(f"teachers.{i} tokenizes differently from the student ({why}): such a teacher trains "
                          "through the cross-tokenizer loss; add one, e.g. losses.ct={type: cross_tokenizer, weight: "
                          "30}, or give it the student's tokenizer")
    served = [j for j in alm if recipe.teachers[j].server]
    if served:
        raise ConfigError(f"teachers.{served[0]} is served and tokenizes differently from the student: the "
                          "cross-tokenizer loss reads the teacher's logits over its own tokens, which a server does "
                          f"not return; drop teachers.{served[0]}.server to run it locally")
    if mt.mix == "learned":
        raise ConfigError(f"llm.multi_teacher.mix=learned trains weights through one mixed distribution, and "
                          f"teachers.{i} tokenizes differently from the student: use mix=fixed, mean or route")
    if token and not same:
        raise ConfigError(f"losses {token} compare next-token distributions over the student's vocabulary, and no "
                          f"teacher shares the student's tokenizer (teachers {alm} differ): drop them")
    shares = teacher_shares(mt.mix, mt.weights, len(recipe.teachers)) if mt.mix != "route" else None
    taught = [j for j in same if shares is None or shares[j] > 0]
    if taught and not token:
        raise ConfigError(f"teachers.{taught[0]} shares the student's tokenizer and teaches through token KD: add a "
                          "token_kd loss, e.g. losses.kd={type: token_kd, weight: 0.5}")
    return alm


def build_cross_teachers(recipe: Recipe, teacher_toks: list, student_tok, alm: list[int], loss, texts: tuple,
                         routes: dict | None) -> CrossTeachers:
    """The ALM teachers' batchers, training texts and evaluation blocks (see `CrossTeachers`); `loss` is the recipe's
    cross_tokenizer loss (its `chunks` make the alignment), `texts` the (train, test) texts and `routes` each
    text's teacher when routed (`build.lm_texts`, `build.text_routes`)."""
    from .cross_tokenizer import CrossTokenizerBatcher
    from .text_data import pack_blocks

    lc, mt = recipe.llm, recipe.llm.multi_teacher
    train, test = texts
    batchers = {j: CrossTokenizerBatcher(teacher_toks[j], student_tok, lc.block_size, chunks=loss.chunks) for j in alm}
    out = CrossTeachers(batchers, train, eval_blocks={j: pack_blocks(test, teacher_toks[j], lc.block_size)
                                                      for j in alm})
    if mt.mix != "route":
        out.shares = teacher_shares(mt.mix, mt.weights, len(recipe.teachers))
        return out
    mine = [(t, r) for t, r in zip(train, routes["train"]) if r in alm]
    out.texts, out.owner = [t for t, _ in mine], torch.tensor([r for _, r in mine], dtype=torch.long)
    by_route = [[t for t, r in zip(test, routes["test"]) if r == k] for k in range(len(recipe.teachers))]
    out.eval_blocks_by_route = {j: [pack_blocks(texts, teacher_toks[j], lc.block_size) for texts in by_route]
                                for j in alm}
    return out


class RoutedPaths:
    """`mix=route` with ALM teachers: each epoch's global batches, each from one path (key None: the token blocks;
    key j: the texts of ALM teacher j). Each path's items are permuted (seeded by seed and epoch) and cut into
    global batches (the remainder dropped), and the batches of all paths are shuffled together with the same
    generator: a resumed run draws what the uninterrupted one drew."""

    def __init__(self, paths: dict, global_batch: int, seed: int):
        self.paths = {k: v for k, v in paths.items() if len(v)}  # path key -> item indices
        for key, items in self.paths.items():
            if len(items) < global_batch:  # its teacher would never teach
                what = "token blocks" if key is None else f"texts routed to teachers.{key}"
                raise ConfigError(f"{len(items)} {what} make no batch of {global_batch} (data.batch_size x "
                                  "processes): use more text or a smaller data.batch_size")
        self.global_batch, self.seed = global_batch, seed
        self.steps_per_epoch = sum(len(v) // global_batch for v in self.paths.values())
        self._epoch: tuple[int, list] | None = None

    def epoch(self, epoch: int) -> list[tuple[int | None, Tensor]]:
        if self._epoch is None or self._epoch[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            batches = []
            for key, items in self.paths.items():
                items = items[torch.randperm(len(items), generator=g)]
                n = len(items) // self.global_batch
                batches += [(key, items[b * self.global_batch:(b + 1) * self.global_batch]) for b in range(n)]
            self._epoch = (epoch, [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()])
        return self._epoch[1]

    def batch(self, epoch: int, step: int, process: int, batch_size: int) -> tuple[int | None, Tensor]:
        """This process's share of the step's global batch, and its path."""
        key, items = self.epoch(epoch)[step]
        return key, items[process * batch_size:(process + 1) * batch_size]
