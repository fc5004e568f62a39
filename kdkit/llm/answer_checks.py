"""How a completion is judged against the gold answer (`cot.answer_check`): what the filter keeps and what the
evaluation counts.

- ``numeric`` (default): the stated final answer (`answers.extract_answer`) equals the gold one as a number;
- ``exact``: the stated final answer (after '####', 'the answer is', or the last line) equals the gold one as
  text, stripped and case-insensitive: labels, words;
- ``module:function``: a user function ``f(completion, gold) -> bool`` given the whole completion, for anything
  else (multiple choice, code, units); imported when the recipe is checked, so a typo fails before any work.
"""
from __future__ import annotations

import importlib
from typing import Callable

from ..errors import ConfigError
from .answers import answers_match, extract_answer

AnswerCheck = Callable[[str, str], bool]
BUILTIN = ("numeric", "exact")


def _numeric(completion: str, gold: str) -> bool:
    return answers_match(extract_answer(completion), gold)


def _exact(completion: str, gold: str) -> bool:
    return stated_text(completion).casefold() == str(gold).strip().rstrip(".").strip().casefold()


def stated_text(text: str) -> str:
    """The final answer as text: after the last '#### ', else after the last 'answer is' / 'answer:', else the
    last non-empty line; stripped, a trailing period and markdown bold removed."""
    import re

    text = text or ""
    head, sep, tail = text.rpartition("####")
    if sep:
        found = tail.strip().splitlines()[:1]
    else:
        found = re.findall(r"answer\s*(?:is|:)\s*([^\n]+)", text, re.IGNORECASE)[-1:] or \
            [line for line in text.strip().splitlines() if line.strip()][-1:]
    return found[0].replace("**", "").strip().rstrip(".").strip() if found else ""


def answer_check(name: str) -> AnswerCheck:
    """The check `name` stands for (see the module docstring); an unknown name or import fails in one line."""
    if name == "numeric":
        return _numeric
    if name == "exact":
        return _exact
    module, sep, attr = str(name).partition(":")
    if not sep or not module or not attr:
        raise ConfigError(f"cot.answer_check={name!r} is not allowed: expected numeric, exact, or module:function "
                          "(a function f(completion, gold) -> bool)")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cot.answer_check={name!r}: cannot import {attr} from {module} "
                          f"({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise ConfigError(f"cot.answer_check={name!r}: {module}.{attr} is not callable")
    return fn
