"""What a condense method factory is given: the validated config, and data a caller passes instead of a name.

Factories check their options and store them; the data is loaded in `Method.prepare`, after the run folder's
resume rule was checked, so a bad command line is refused before any data or model is touched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class CondenseContext:
    config: Any  # ImageCondenseConfig or GraphCondenseConfig
    splits: tuple | None = None  # images: (train, test) `ImageSplit`s to use instead of loading `config.dataset`
    graphs: Any = None  # graphs: a torch-geometric dataset to use instead of loading `config.dataset`
