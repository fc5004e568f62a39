"""`kdkit bench throughput`'s `mdistiller` variant: skipped with one line without `.refs/mdistiller`, its ratio in the
table (old result files still render), and, where the fetched code is present, two real steps of mdistiller's loop."""
import json
import math

import pytest


def test_mdistiller_variant_is_skipped_with_one_line_when_its_code_is_absent(tmp_path, monkeypatch, capsys):
    from kdkit.bench.throughput import run_throughput

    monkeypatch.setenv("KDKIT_REFS_DIR", str(tmp_path / "no-refs"))
    res = run_throughput(["variants=mdistiller", "teacher=airnet_w16", "student=airnet_w8", "steps=2", "warmup=1",
                          "batch=8", f"out={tmp_path / 'out'}"])
    assert res == {"rows": [], "path": None} and not (tmp_path / "out").exists()  # nothing measured, nothing written
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "mdistiller: skipped: no mdistiller code in" in out[0] and "fetch-refs.sh" in out[0]


def test_unknown_variant_is_one_error_line(capsys):
    from kdkit.cli import main

    assert main(["bench", "throughput", "variants=plain,mdistilller"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdkit: error:") and "mdistiller" in err[0]


def test_table_has_the_mdistiller_ratio_and_renders_old_results(tmp_path, monkeypatch):
    from kdkit.bench import results, throughput

    folder = tmp_path / "results"
    (folder / "throughput").mkdir(parents=True)
    monkeypatch.setattr(results, "RESULTS_DIR", folder)
    monkeypatch.setattr(throughput, "RESULTS_DIR", folder)
    hw = {"device": "cpu", "cpu": "Test CPU", "threads": 2}
    base = {"kind": "throughput", "teacher": "airnet_w32", "student": "airnet_w16", "batch": 256, "hardware": hw,
            "git_commit": "abc1234", "command": "kdkit bench throughput"}
    old = {"variant": "fp32", "student_alone_img_s": 100.0, "kd_img_s": 50.0, "kd_over_alone": 0.5,
           "kd_over_plain_kd": 1.25}
    rows = [{"variant": "mdistiller", "student_alone_img_s": 90.0, "kd_img_s": 40.0, "kd_over_alone": 0.44,
             "kd_over_plain_kd": 1.0, "kd_over_mdistiller_kd": 1.0},
            {**old, "kd_img_s": 60.0, "kd_over_mdistiller_kd": 1.5}]
    (folder / "throughput" / "1-old.json").write_text(json.dumps({**base, "rows": [old]}))
    (folder / "throughput" / "2-new.json").write_text(json.dumps({**base, "rows": rows}))
    md = throughput.write_markdown().read_text()
    assert "| KD vs plain PyTorch loop | KD vs mdistiller |" in md
    assert "| 50.0 | 0.50 | 1.25x | - | abc1234 |" in md  # an old file: no mdistiller ratio
    assert "| mdistiller | 90.0 | 40.0 | 0.44 | 1.00x | 1.00x |" in md
    assert "| fp32 | 100.0 | 60.0 | 0.50 | 1.25x | 1.50x |" in md


def test_mdistiller_loop_runs_two_steps_of_its_own_code():
    from kdkit.bench.mdistiller_loop import measure_mdistiller, missing

    if missing():
        pytest.skip(missing())
    losses: list[float] = []
    img_s = measure_mdistiller("airnet_w16", "airnet_w8", batch=8, steps=2, warmup=1, losses=losses)
    assert img_s > 0 and len(losses) == 3 and all(math.isfinite(v) for v in losses)
