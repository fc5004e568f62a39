"""Fused linear + token KD: `token_kd_loss(h_s @ W_s.T, h_t @ W_t.T, labels)` without the tokens x vocab logits.

The LM head's logits are the largest tensors of LM distillation (16k tokens x 152k vocab in fp32 is 10 GB, and
autograd keeps several). `fused_linear_kd` computes the same loss chunk by chunk of tokens (see `chunked.py`),
so peak memory is O(chunk x vocab). The backends that compute a chunk's rows:

- ``torch``: `rows.py`. `kdkit.divergence.Divergence.value_and_grad` (closed-form gradients) on cache-sized
  blocks of the chunk's rows, float32 (float64 for float64 inputs). Any device.
- ``compiled``: the same rows through ``torch.compile`` (one fused C++/Triton loop nest per block; the first call
  of each shape compiles, a few seconds).
- ``triton``: `fused_linear_kd_triton.py`, one Triton kernel per chunk with an online softmax and analytic
  gradients written in place into the logits buffer. CUDA, or CPU under ``TRITON_INTERPRET=1`` (tests).
- ``auto``: triton on CUDA (when triton imports); on CPU ``compiled`` for calls large enough to repay the
  compilation (tokens x vocab >= `COMPILE_MIN_ELEMENTS`, and a C++ compiler present), ``torch`` otherwise.

``chunk_size=None`` picks the chunk from the shape (`auto_chunk_size`): on CPU 1024 tokens up to a 64k
vocabulary, fewer above, so the LM-head matmuls run at full speed while a chunk's logits stay within 256 MiB.

The teacher is dense (hidden states + LM head) or a sparse top-k signal (ids + log-probs, densified per chunk by
`sparse_to_dense_logprobs`; the dense log-probs then play the teacher logits, exactly as in
``token_kd_loss(student_logits, sparse_to_dense_logprobs(...))``, temperature included).
"""
from __future__ import annotations

import os
import shutil
import warnings

import torch
from torch import Tensor

from ..divergence import Divergence
from ..errors import ConfigError, ShapeMismatchError
from ..signals import HiddenStates, TeacherSignal, TopK
from .chunked import ChunkedLinearKD, ChunkPlan
from .rows import RowOptions, torch_rows

BACKENDS = ("auto", "torch", "compiled", "triton")
COMPILE_MIN_ELEMENTS = 1 << 24  # tokens x vocab from which compiling the CPU rows pays for itself (~3 s)


def fused_linear_kd(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor | None = None,
                    teacher_weight: Tensor | None = None, labels: Tensor | None = None, *, divergence: str = "fkl",
                    T: float = 1.0, beta: float = 0.5, skew: float = 0.1, ignore_index: int = -100,
                    weights: Tensor | None = None, ce_weight: float = 0.0, kd_weight: float = 1.0,
                    teacher_topk_indices: Tensor | None = None, teacher_topk_logprobs: Tensor | None = None,
                    topk_fill: str = "uniform", student_bias: Tensor | None = None,
                    teacher_bias: Tensor | None = None, chunk_size: int | None = None, backend: str = "auto",
                    teacher: TeacherSignal | None = None, div: Divergence | None = None) -> Tensor:
    """kd_weight * token_kd_loss(student logits, teacher logits, labels, ...) + ce_weight * CE(student logits, labels).

    Shapes: hidden [N, H], weight [V, H], bias [V], labels / weights [N], top-k ids and log-probs [N, k].
    The teacher is given as tensors, or as a typed `teacher` signal (`HiddenStates` or `TopK`; a top-k signal's
    temperature must be T); `div` may replace divergence/T/beta/skew. The KD term is
    `kdkit.losses.token.token_kd_loss` (mean over tokens with labels != ignore_index, optional per-token weights);
    the CE term is the unweighted token mean of cross-entropy at T=1 over the same tokens. Gradients reach the
    student's hidden states, weight and bias; the teacher gets none.
    """
    if div is None:
        div = Divergence(divergence, T, beta, skew)  # checks each value, naming the key
    divergence, T = div.name, div.T
    if teacher is not None:
        teacher_hidden, teacher_weight, teacher_bias, teacher_topk_indices, teacher_topk_logprobs, topk_fill = (
            _unpack_signal(teacher, T, teacher_hidden, teacher_weight, teacher_topk_indices))
    sparse = _check_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, weights,
                           teacher_topk_indices, teacher_topk_logprobs, student_bias, teacher_bias)
    if ce_weight and labels is None:
        raise ConfigError("ce_weight > 0 needs labels (the hard targets of the cross-entropy term)")
    if chunk_size is None:
        chunk_size = auto_chunk_size(student_weight.shape[0], student_hidden.device)
    if isinstance(chunk_size, bool) or not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ConfigError(f"chunk_size={chunk_size!r} is not allowed: expected a positive integer (or None: auto)")
    if topk_fill not in ("uniform", "none"):
        raise ConfigError(f"topk_fill must be 'uniform' or 'none', got {topk_fill!r}")
    opts = RowOptions(div, int(ignore_index), float(kd_weight), float(ce_weight), topk_fill)
    device = student_hidden.device
    which = resolve_backend(backend, device, student_hidden.shape[0] * student_weight.shape[0])
    if which == "triton":
        from .fused_linear_kd_triton import MODES, triton_rows

        if divergence not in MODES:
            warnings.warn(f"kdkit: divergence {divergence!r} has no Triton kernel; fused_linear_kd runs it on the "
                          "torch backend", stacklevel=2)
            which = "torch"
        else:
            rows = triton_rows(opts)
    if which != "triton":
        rows = torch_rows(opts, compiled=which == "compiled")
    s_dtype = _matmul_dtype(student_hidden, student_weight)
    t_dtype = s_dtype if sparse else _matmul_dtype(teacher_hidden, teacher_weight)
    plan = ChunkPlan(chunk_size, s_dtype, t_dtype, student_weight.shape[0], opts.ignore_index, topk_fill,
                     densifies=which != "triton")
    return ChunkedLinearKD.apply(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                 teacher_bias, teacher_topk_indices, teacher_topk_logprobs, labels, weights, plan,
                                 rows)


def auto_chunk_size(vocab: int, device: torch.device) -> int:
    """Tokens per chunk: 1024 on CUDA (Liger's default). On CPU the largest power of two in [256, 1024] whose
    float32 logits stay within 256 MiB per side (1024 tokens up to a 64k vocabulary, 256 at Gemma's 262k): the
    LM-head weight is streamed from memory once per chunk and matmul, so longer chunks run the matmuls faster
    (measured at 2048 x 576 x 49152 on 2 cores: 2.35 s at 1024, 2.70 s at 256, 3.39 s at 128), up to a point
    (512 x 640 x 262144: 5.08 s at 512 against 5.10 s at 256, for twice the memory)."""
    if device.type == "cuda":
        return 1024
    rows = max(256, min(1024, (256 << 20) // (4 * vocab)))
    return 1 << (rows.bit_length() - 1)


def resolve_backend(backend: str, device: torch.device, elements: int = 0) -> str:
    """'auto' -> 'triton' on CUDA when triton imports; on CPU 'compiled' for `elements` (tokens x vocab) >=
    COMPILE_MIN_ELEMENTS when a C++ compiler is present (KDKIT_COMPILE=0 turns it off), else 'torch'.
    'triton' on CPU only under the interpreter."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend in ("torch", "compiled"):
        return backend
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if backend == "auto":
        if device.type == "cuda" and _triton_available():
            return "triton"
        big = elements >= COMPILE_MIN_ELEMENTS and device.type == "cpu"
        can = os.environ.get("KDKIT_COMPILE", "1") != "0" and shutil.which(os.environ.get("CXX", "g++")) is not None
        return "compiled" if big and can else "torch"
    if not _triton_available():
        raise ConfigError("backend='triton' needs the triton package (pip install triton); use backend='torch'")
    if device.type != "cuda" and not interpret:
        raise ConfigError(f"backend='triton' runs on CUDA tensors, got {device.type}; for CPU tests set "
                          "TRITON_INTERPRET=1 before triton is first imported, or use backend='torch'")
    return "triton"


def _unpack_signal(teacher: TeacherSignal, T: float, h_t, w_t, topk_idx):
    """(hidden, weight, bias, top-k ids, top-k log-probs, fill) of a typed teacher signal."""
    if h_t is not None or w_t is not None or topk_idx is not None:
        raise ConfigError("give the teacher either as tensors or as `teacher=` signal, not both")
    if isinstance(teacher, HiddenStates):
        return teacher.hidden, teacher.weight, teacher.bias, None, None, "uniform"
    if isinstance(teacher, TopK):
        teacher.check_temperature(T, "fused_linear_kd")
        if teacher.tail == "support":
            raise ConfigError("fused_linear_kd densifies a top-k teacher: tail='support' is not available (use "
                              "tail='uniform' or 'none', or the unfused loss)")
        return None, None, None, teacher.indices, teacher.logprobs, teacher.tail
    raise ConfigError(f"fused_linear_kd takes a HiddenStates or TopK teacher signal, got {teacher.kind}")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _matmul_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype the LM-head matmul runs in: autocast's when autocast is on (as nn.Linear would), else the inputs'."""
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _check_inputs(h_s, w_s, h_t, w_t, labels, weights, topk_idx, topk_lp, b_s, b_t) -> bool:
    """Shapes must line up; returns True for a sparse (top-k) teacher. Errors say which tensor and why."""
    if h_s.ndim != 2 or w_s.ndim != 2:
        raise ShapeMismatchError(f"student hidden {tuple(h_s.shape)} must be [tokens, H] and student weight "
                                 f"{tuple(w_s.shape)} [V, H] (flatten batch and sequence first)")
    n, (v, hid) = h_s.shape[0], w_s.shape
    if h_s.shape[1] != hid:
        raise ShapeMismatchError(f"student hidden size {h_s.shape[1]} != student weight's {hid} "
                                 f"(hidden {tuple(h_s.shape)}, weight {tuple(w_s.shape)} = [V, H])")
    dense = h_t is not None or w_t is not None
    sparse = topk_idx is not None or topk_lp is not None
    if dense == sparse:
        raise ConfigError("give the teacher either dense (teacher_hidden and teacher_weight) or sparse "
                          "(teacher_topk_indices and teacher_topk_logprobs), not " + ("both" if dense else "neither"))
    if dense:
        if h_t is None or w_t is None:
            raise ConfigError("a dense teacher needs both teacher_hidden and teacher_weight")
        if h_t.ndim != 2 or w_t.ndim != 2 or h_t.shape[0] != n or h_t.shape[1] != w_t.shape[1]:
            raise ShapeMismatchError(f"teacher hidden {tuple(h_t.shape)} must be [{n}, Ht] (the student's tokens) "
                                     f"and teacher weight {tuple(w_t.shape)} [V, Ht]")
        if w_t.shape[0] != v:
            raise ShapeMismatchError(f"teacher vocabulary {w_t.shape[0]} != student vocabulary {v}; token KD needs "
                                     "one vocabulary (slice a padded head to the shared rows, or see `kdkit check`)")
        if b_t is not None and b_t.shape != (v,):
            raise ShapeMismatchError(f"teacher bias {tuple(b_t.shape)} must be [{v}]")
    else:
        if topk_idx is None or topk_lp is None:
            raise ConfigError("a sparse teacher needs both teacher_topk_indices and teacher_topk_logprobs")
        if topk_idx.shape != topk_lp.shape or topk_idx.ndim != 2 or topk_idx.shape[0] != n:
            raise ShapeMismatchError(f"top-k ids {tuple(topk_idx.shape)} and log-probs {tuple(topk_lp.shape)} must "
                                     f"both be [{n}, k]")
        if b_t is not None:
            raise ConfigError("teacher_bias has no meaning with a sparse (top-k) teacher")
    if labels is not None and labels.shape != (n,):
        raise ShapeMismatchError(f"labels {tuple(labels.shape)} must be [{n}], one per token")
    if weights is not None and weights.shape != (n,):
        raise ShapeMismatchError(f"per-token weights {tuple(weights.shape)} must be [{n}], one per token")
    if b_s is not None and b_s.shape != (v,):
        raise ShapeMismatchError(f"student bias {tuple(b_s.shape)} must be [{v}]")
    return sparse
