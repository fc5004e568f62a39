"""A pickle planted where kdkit reads weights, checkpoints, stores or teachers never runs: each loader path
refuses it in one line (exit 2) and the pickle's payload, which would create a file, never executes."""
from __future__ import annotations

import hashlib
import json
import pickle

import pytest

from kdkit.cli import main


class _Payload:
    """Unpickling this creates `marker` (what a malicious checkpoint would do instead)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path, marker):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(_Payload(marker)))
    return path


def _checkpoint_folder(root, marker):
    """A checkpoint folder whose manifest is right but whose tensor file is a pickle."""
    folder = root / "run" / "checkpoints" / "step-00000001"
    _plant(folder / "state.safetensors", marker)
    (folder / "state.json").write_text(json.dumps({"step": 1, "config": None, "rng": {}, "method": {}}))
    files = {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in ("state.safetensors", "state.json")}
    (folder / "manifest.json").write_text(json.dumps({"format": "kdkit-checkpoint", "version": 1, "files": files}))
    return root / "run"


CASES = {
    "teacher weights": lambda t, m: ["distill", "recipe=demo-kd", f"teacher.checkpoint={_plant(t / 'model.safetensors', m)}"],
    "stored logits": lambda t, m: ["distill", "recipe=demo-kd", "teacher.model=null",
                                   f"teacher.cache={_plant(t / 'logits.safetensors', m)}"],
    "student init": lambda t, m: ["train", "recipe=demo-teacher", f"student.checkpoint={_plant(t / 'model.safetensors', m)}"],
    "resume checkpoint": lambda t, m: ["train", "recipe=demo-teacher", f"resume={_checkpoint_folder(t, m)}"],
    "diffusion teacher": lambda t, m: ["diffusion", "dmd2", f"teacher={_plant(t / 'model.safetensors', m)}"],
    "diffusion resume": lambda t, m: ["diffusion", "dmd2", f"resume={_checkpoint_folder(t, m)}"],
    "condense resume": lambda t, m: ["condense", "mutag", f"resume={_checkpoint_folder(t, m)}"],
    "signal store": lambda t, m: ["distill", "recipe=smollm2-kd-small", "teacher.model=null",
                                  f"teacher.cache={_plant(t / 'store' / 'shard-00000.parquet', m).parent}"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_planted_pickle_is_refused_and_never_runs(case, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "pwned"
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    rc = main(CASES[case](tmp_path, marker))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("kdkit: error: ")
    assert not marker.exists(), "the planted pickle was executed"
    assert list(work.iterdir()) == []
