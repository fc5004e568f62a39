"""A teacher served over HTTP by vLLM's OpenAI-compatible server: its top-k prompt log-probs and its completions.

Why: the open LM-distillation tools (TRL's server/async distillation trainers, DistillKit, verl) keep the teacher
in its own process, often on other GPUs, and ask it for top-k `prompt_logprobs` over the training tokens; the
student's trainer then never holds the teacher's weights. `ServedTeacher` is that client: the same `TopK` signal a
local teacher's top-k gives (`kdkit.signals`), at temperature 1 (vLLM returns prompt log-probs of the raw logits,
and kdkit requests temperature 1, top-p 1, no top-k, so either log-prob mode gives the same numbers), for a live
run or a signal store, and completions for chain-of-thought generation.

Protocol (vLLM >= 0.6, OpenAI-compatible): `GET /v1/models` names the served model; `POST /tokenize` checks that
the server's tokenizer encodes a probe text as the local one does; `POST /v1/completions` with the prompt as token
ids, `max_tokens=1` and `prompt_logprobs=k` returns, for each prompt token t >= 1, the k most likely ids at t
(and the actual token's); kdkit's position t (predicting token t + 1) is the server's entry t + 1.

Failures each give one line naming the URL and the way out: nothing listening, no reply within the timeout after
the retries (connection errors, 429 and 5xx replies are retried with exponential backoff), a reply that is not
vLLM's (no `prompt_logprobs`), another model or tokenizer, k above the server's `--max-logprobs`, and fewer
prompt log-probs than prompt tokens (what a prefix cache that skips cached tokens does to them).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError, KdkitError, TokenizerMismatchError
from ..signals import TopK
from .generation_contract import (Completion, SamplingSpec, check_prompts, encode_prompt, replicate,
                                  report_empty)

# Text that exercises spaces, digits, punctuation, casing and non-ASCII: two tokenizers that encode it alike
# almost surely share their merges; the model name check catches the rest.
PROBE = "Teacher probe: 12 + 345 = 357.\n  Ünïcödé café, naïve — 日本語 tokens!"

# Sent with every request: a model's generation_config may set top-k, min-p or a repetition penalty, which vLLM
# applies unless the request says otherwise; the generation contract has none of them.
NEUTRAL = {"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


class TeacherServerError(KdkitError, ConnectionError):
    """The teacher server is unreachable, too slow, or replies with something kdkit cannot use."""


@dataclass
class ServedTeacher:
    """Client of one OpenAI-compatible vLLM server. `tokenizer`: the local tokenizer of the same model (prompts
    and token ids are made here); `model`: the id the server serves it under (default: the only one it serves)."""

    url: str
    tokenizer: Any
    model: str | None = None
    k: int = 20
    timeout: float = 60.0
    concurrency: int = 4
    retries: int = 3
    backoff: float = 0.5
    vocab_size: int | None = None
    name: str = "server"
    info: dict = field(default_factory=dict)
    fingerprint: str | None = None  # the local tokenizer's, carried by every signal (checked against the student's)

    def __post_init__(self):
        import requests

        self.url = self.url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"teacher.server must be an http(s) URL such as http://127.0.0.1:8000, got {self.url!r}")
        for key, value, low in (("server_k", self.k, 1), ("server_concurrency", self.concurrency, 1),
                                ("server_retries", self.retries, 0)):
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"teacher.{key} must be an integer >= {low}, got {value!r}")
        if not (isinstance(self.timeout, (int, float)) and math.isfinite(self.timeout) and self.timeout > 0):
            raise ConfigError(f"teacher.server_timeout must be a number of seconds > 0, got {self.timeout!r}")
        if self.vocab_size is None and self.tokenizer is not None:
            self.vocab_size = len(self.tokenizer)
        self.session = requests.Session()
        self.session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=self.concurrency))
        self.session.mount("https://", requests.adapters.HTTPAdapter(pool_maxsize=self.concurrency))

    # ------------------------------------------------------------------ HTTP

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        """One JSON request, retried on connection errors, timeouts, 429 and 5xx; one-line errors otherwise."""
        import requests

        where = f"teacher.server={self.url}: {method} {path}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                reply = self.session.request(method, self.url + path, json=body, timeout=self.timeout)
            except requests.exceptions.ConnectionError as e:
                refused = "refused" in str(e).lower()
                last = "connection refused: nothing listens there" if refused else f"cannot connect ({type(e).__name__})"
                continue
            except requests.exceptions.Timeout:
                last = f"no reply within {self.timeout:g} s"
                continue
            if reply.status_code == 429 or reply.status_code >= 500:
                last = f"the server answered {reply.status_code} {reply.reason}"
                continue
            if reply.status_code >= 400:
                raise TeacherServerError(f"{where} was refused ({reply.status_code}): {_message(reply)}"
                                         + _hint(_message(reply), self.k))
            try:
                return reply.json()
            except ValueError:
                raise TeacherServerError(f"{where}: the reply is not JSON (is this a vLLM server?): "
                                         f"{reply.text[:120]!r}") from None
        tries = self.retries + 1
        way_out = ("raise teacher.server_timeout or lower teacher.server_concurrency" if last.startswith("no reply")
                   else "start one with `kdkit serve-teacher MODEL`, or check the URL")
        raise TeacherServerError(f"{where}: {last} (after {tries} tr{'y' if tries == 1 else 'ies'}); {way_out}")

    # ------------------------------------------------------------------ checks

    def check(self) -> dict:
        """The server is up, serves `model` (chosen when it serves one model), and tokenizes as the local tokenizer
        does; returns what it said about the model (max_model_len)."""
        self.check_model()
        self.check_tokenizer()
        return self.info

    def check_model(self) -> dict:
        """The server is up and serves `model` (chosen when it serves one model): asked before any local work, so an
        unreachable server is refused before the teacher's tokenizer is loaded (or converted)."""
        served = self._request("GET", "/v1/models").get("data")
        if not isinstance(served, list) or not all(isinstance(m, dict) and "id" in m for m in served):
            raise TeacherServerError(f"teacher.server={self.url}: GET /v1/models did not list models (is this an "
                                     "OpenAI-compatible server?)")
        ids = [m["id"] for m in served]
        if self.model is None:
            if len(ids) != 1:
                raise ConfigError(f"teacher.server={self.url} serves {ids}; name one with teacher.server_model")
            self.model = ids[0]
        if self.model not in ids:
            raise TeacherServerError(f"teacher.server={self.url} serves {ids}, not {self.model!r} "
                                     "(teacher.server_model); point it at the server of that model")
        self.info = next(m for m in served if m["id"] == self.model)
        return self.info

    def check_tokenizer(self) -> None:
        """The server tokenizes a probe text as the local tokenizer does (else its log-probs are over other ids)."""
        got = self._request("POST", "/tokenize", {"model": self.model, "prompt": PROBE, "add_special_tokens": False})
        mine = list(self.tokenizer(PROBE, add_special_tokens=False)["input_ids"])
        if got.get("tokens") != mine:
            name = getattr(self.tokenizer, "name_or_path", "the local tokenizer")
            raise TokenizerMismatchError(
                f"teacher.server={self.url} ({self.model}) tokenizes a probe text differently from {name} "
                f"({len(got.get('tokens') or [])} vs {len(mine)} tokens): its log-probs would be over other ids; "
                "serve the teacher whose tokenizer the run uses")

    # ------------------------------------------------------------------ teacher signal

    def prompt_topk(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (ids, log-probs) [len(ids) - 1, k] of the teacher at every position t predicting token t + 1."""
        return self._scored(ids)[:2]

    def nll(self, input_ids: torch.Tensor) -> tuple[float, int]:
        """(sum of -log p(token t + 1 | tokens <= t), number of such tokens) over a batch of unpadded blocks: the
        teacher's perplexity from the same replies (vLLM returns each prompt token's own log-prob beside the top-k)."""
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            got = list(pool.map(self._scored, [row.tolist() for row in input_ids.cpu()]))
        return -sum(float(own.double().sum()) for _, _, own in got), sum(len(own) for _, _, own in got)

    def _scored(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(top-k ids, top-k log-probs) [len(ids) - 1, k] and each next token's own log-prob [len(ids) - 1]."""
        body = {"model": self.model, "prompt": [int(i) for i in ids], "max_tokens": 1, "temperature": 1.0,
                "top_p": 1.0, **NEUTRAL, "prompt_logprobs": self.k}
        reply = self._request("POST", "/v1/completions", body)
        try:
            entries = reply["choices"][0]["prompt_logprobs"]
        except (KeyError, IndexError, TypeError):
            raise TeacherServerError(f"teacher.server={self.url}: POST /v1/completions replied without "
                                     "choices[0].prompt_logprobs (a vLLM extension; is this a vLLM server?)") from None
        if not isinstance(entries, list) or len(entries) != len(ids) or any(e is None for e in entries[1:]):
            have = sum(e is not None for e in entries[1:]) if isinstance(entries, list) else 0
            raise TeacherServerError(
                f"teacher.server={self.url}: prompt log-probs at {have} of the {len(ids) - 1} prompt tokens after the "
                "first; a prefix cache "
                "that skips cached tokens does this: restart the server with --no-enable-prefix-caching")
        out_ids = torch.empty(len(ids) - 1, self.k, dtype=torch.long)
        out_lp = torch.empty(len(ids) - 1, self.k, dtype=torch.float32)
        own = torch.empty(len(ids) - 1, dtype=torch.float64)
        for t, entry in enumerate(entries[1:]):
            try:
                ranked = sorted(((v["rank"], int(tok), float(v["logprob"])) for tok, v in entry.items()))
                own[t] = float(entry[str(int(ids[t + 1]))]["logprob"])
            except (AttributeError, KeyError, TypeError, ValueError):
                raise TeacherServerError(f"teacher.server={self.url}: malformed prompt log-prob entry at token "
                                         f"{t + 1}: {str(entry)[:120]}") from None
            top = [r for r in ranked if r[0] <= self.k][: self.k]
            if len(top) < self.k:
                raise TeacherServerError(f"teacher.server={self.url}: {len(top)} ranked log-probs at token {t + 1}, "
                                         f"asked for {self.k} (teacher.server_k)")
            out_ids[t] = torch.tensor([r[1] for r in top])
            out_lp[t] = torch.tensor([r[2] for r in top])
        return out_ids, out_lp, own

    def topk_signal(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TopK:
        """The `TopK` signal at the shifted positions [B, L - 1] of a batch (rows in parallel, at most
        `concurrency` requests at a time). Padding gets ids 0..k-1 at log(1/k): a valid distribution the loss
        never reads, since padded labels are masked."""
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        rows = [ids[m].tolist() for ids, m in zip(input_ids.cpu(), mask.cpu())]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            got = list(pool.map(self.prompt_topk, rows))
        b, length = input_ids.shape
        ids = torch.arange(self.k).expand(b, length - 1, self.k).clone()
        logprobs = torch.full((b, length - 1, self.k), -math.log(self.k))
        for i, (m, (top_ids, top_lp)) in enumerate(zip(mask.cpu(), got)):
            where = m.nonzero()[:, 0][:-1]  # the positions that predict a real next token (left or right padding)
            ids[i, where], logprobs[i, where] = top_ids, top_lp
        if self.fingerprint is None:
            from .tokenizers import tokenizer_fingerprint

            self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        dev = input_ids.device
        return TopK(indices=ids.to(dev), logprobs=logprobs.to(dev), temperature=1.0, tail="uniform",
                    tokenizer=self.fingerprint)

    def identity(self) -> dict:
        """What a signal store records about where its teacher signal came from."""
        return {"name": f"{self.url} {self.model}", "class": type(self).__name__, "server": self.url,
                "served_model": self.model, "max_model_len": self.info.get("max_model_len"),
                "sampling": {"temperature": 1.0, "top_p": 1.0, **NEUTRAL, "prompt_logprobs": self.k}}

    # ------------------------------------------------------------------ generation (a GenerationBackend)

    def generate(self, prompts: list[str], spec: SamplingSpec) -> list[list[Completion]]:
        """Completions of formatted prompts, the generation contract's meaning (token-id prompts, plain
        temperature + top-p, stop strings cut, EOS ends)."""
        check_prompts(prompts)

        def one(i_prompt):
            i, prompt = i_prompt
            body = {"model": self.model, "prompt": encode_prompt(self.tokenizer, prompt),
                    "n": 1 if spec.greedy else spec.n, "max_tokens": spec.max_new_tokens,
                    **NEUTRAL, "temperature": spec.temperature, "top_p": 1.0 if spec.greedy else spec.top_p,
                    "seed": spec.seed + i, "stop": spec.stop or None, "return_token_ids": True}
            reply = self._request("POST", "/v1/completions", body)
            try:
                choices = sorted(reply["choices"], key=lambda c: c["index"])
                return [Completion(c["text"], _generated_tokens(c), "length" if c["finish_reason"] == "length"
                                   else "stop") for c in choices]
            except (KeyError, TypeError):
                raise TeacherServerError(f"teacher.server={self.url}: POST /v1/completions replied without "
                                         "choices[].text/finish_reason") from None

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            results = list(pool.map(one, enumerate(prompts)))
        if spec.greedy and spec.n > 1:
            results = replicate(results, spec.n)
        report_empty(results, f"teacher.server={self.url}", spec)
        return results


def _generated_tokens(choice: dict) -> int:
    ids = choice.get("token_ids")
    if isinstance(ids, list):
        return len(ids)
    raise TeacherServerError("the server's completion has no token_ids (vLLM's return_token_ids); upgrade vLLM to "
                             ">= 0.10")


def _message(reply) -> str:
    try:
        body = reply.json()
        msg = body.get("message") or (body.get("error") or {}).get("message") or str(body)
    except ValueError:
        msg = reply.text
    return " ".join(str(msg).split())[:200]


def _hint(message: str, k: int) -> str:
    if "logprobs" in message.lower():
        return f"; start the server with --max-logprobs {k} or more, or lower teacher.server_k"
    return ""


def served_teacher(cfg) -> ServedTeacher:
    """The recipe's `teacher.server` as a checked client: `teacher.model` names the teacher (its tokenizer is
    loaded here, its weights stay on the server); the server must serve that model's tokenizer."""
    from .models import load_tokenizer, resolve_lm

    if not cfg.model:
        raise ConfigError("teacher.server needs teacher.model too: the teacher's name or folder, whose tokenizer "
                          "makes the token ids the server scores")
    teacher = ServedTeacher(cfg.server, None, model=cfg.server_model, k=cfg.server_k, timeout=cfg.server_timeout,
                            concurrency=cfg.server_concurrency, retries=cfg.server_retries)
    teacher.check_model()
    teacher.tokenizer = load_tokenizer(cfg.model)
    teacher.vocab_size = _config_vocab(resolve_lm(cfg.model)) or len(teacher.tokenizer)
    teacher.check_tokenizer()
    return teacher


def _config_vocab(folder) -> int | None:
    """The teacher config's vocabulary size (the width of its log-probs), or None for a tokenizer-only folder."""
    if Path(folder).is_dir() and not (Path(folder) / "config.json").is_file():
        return None
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder)).vocab_size
