"""`kdkit bench condense-speed` and the reference-code column: tiny runs, the table they render, the skip rule."""
from __future__ import annotations

import json

from kdkit.bench import condense_speed
from kdkit.bench.condense_images import matching_reference


def test_speed_bench_times_each_implementation_in_its_own_process(tmp_path, monkeypatch):
    """A tiny grid runs end to end: every row has seconds and a measured peak; the reference is skipped (and says
    so) when its code is absent; the table shows the constant-memory overhead and flatness goals."""
    monkeypatch.setattr(condense_speed, "refs_dir", lambda: tmp_path / "no-reference")
    monkeypatch.setattr(condense_speed, "TABLE", tmp_path / "condense-speed.md")
    monkeypatch.setattr("kdkit.bench.results.RESULTS_DIR", tmp_path / "results")
    out = condense_speed.run_condense_speed(["steps=2", "memory_steps=6", "ipc=1", "width=4", "repeats=1",
                                             "impls=reference,kdkit-unrolled,kdkit-constant-memory"])
    rec = json.loads(next((tmp_path / "results" / "condense-speed").glob("*.json")).read_text())
    rows = {(r["impl"], r["syn_steps"]): r for r in rec["rows"]}
    assert rows[("reference", 2)]["status"].startswith("skipped: no reference code")
    for key in (("kdkit-unrolled", 2), ("kdkit-constant-memory", 2)):
        assert rows[key]["status"] == "ok" and rows[key]["seconds"] > 0 and rows[key]["peak_bytes"] >= 0
    assert ("kdkit-constant-memory", 6) not in rows  # the flatness point is the compiled mode's
    table = out.read_text()
    assert "| 2 | kdkit-constant-memory |" in table and "overhead" in table
    assert "reference N=2: skipped" in table


def test_reference_column_needs_the_same_budget():
    ours = {"method": "mtt", "ipc": 10, "settings": {"width": 32, "train_subset": 5000, "test_subset": 2000,
                                                     "experts": 5, "expert_epochs": 10, "syn_steps": 20,
                                                     "iterations": 200, "eval_epochs": 300, "eval_nets": 3}}
    same = {"method": "mtt", "ipc": 10, "time": "2026-12-06T00:00:00", "settings": dict(ours["settings"], lr_img=1e3)}
    newer = {**same, "time": "2026-12-07T00:00:00"}
    other = {**same, "settings": dict(same["settings"], iterations=100)}
    assert matching_reference(ours, [same, other]) is same
    assert matching_reference(ours, [same, newer, other]) is newer
    assert matching_reference(ours, [other]) is None
    assert matching_reference({**ours, "ipc": 1}, [same]) is None


def test_reference_bench_names_the_missing_code_and_the_allowed_widths(tmp_path, monkeypatch):
    import pytest

    from kdkit.bench import condense_reference
    from kdkit.errors import ConfigError

    monkeypatch.setattr(condense_reference, "refs_dir", lambda: tmp_path / "refs" / "mtt-distillation")
    with pytest.raises(ConfigError, match="clone GeorgeCazenavette/mtt-distillation"):
        condense_reference.run_condense_reference(["methods=mtt"])
    with pytest.raises(ConfigError, match="width 32, 64, 128 or 256"):
        condense_reference.run_condense_reference(["width=16"])
    with pytest.raises(ConfigError, match="unknown 'cvdd'"):
        condense_reference.run_condense_reference(["methods=cvdd"])
