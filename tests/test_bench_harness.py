"""The bench harness shared by `kdkit bench llm|cot`: option splitting, and tables built only from result files."""
import hashlib
import json
import sys
from pathlib import Path

import pytest

from kdkit.bench.cot import write_cot_markdown
from kdkit.bench.llm import LLMBenchOptions
from kdkit.bench.results import bench_options
from kdkit.errors import ConfigError


def test_bench_options_keep_the_bench_options_apart_from_recipe_overrides():
    opts, rest = bench_options(LLMBenchOptions, ["seeds=3", "optim.lr=1e-4", "ce_weight=0.5"], passthrough=True)
    assert (opts.seeds, opts.out, opts.names()) == (3, None, ["kd", "baseline"])
    assert rest == ["optim.lr=1e-4", "ce_weight=0.5"]
    with pytest.raises(ConfigError, match="'seeds' is not key=value"):
        bench_options(LLMBenchOptions, ["seeds"], passthrough=True)
    with pytest.raises(ConfigError, match="seeds=0 is not allowed: expected an integer >= 1"):
        bench_options(LLMBenchOptions, ["seeds=0"], passthrough=True)
    with pytest.raises(ConfigError, match="methods='kd,nope' is not allowed: expected a comma list of kd, baseline"):
        bench_options(LLMBenchOptions, ["methods=kd,nope"], passthrough=True)


def _row(variant, seed, accuracy):
    return {"kind": "cot", "recipe": "cot-math-small", "variant": variant, "seed": seed, "overrides": [], "command": "kdkit bench cot",
            "accuracy": {k: {"accuracy": v} for k, v in accuracy.items()},
            "filter": {"correct": 3, "generated": 8} if variant == "rationale_redi" else None,
            "hardware": {"device": "cpu", "threads": 2}}


def _split_row(path):
    """The test split's row of a CoT table."""
    return next(line for line in path.read_text().splitlines() if "| test (" in line).split(" | ")


def test_cot_table_means_over_seeds_and_reads_each_eval_from_the_run_that_made_it(tmp_path):
    rows = [_row("answer_only", 0, {"student_before": 0.0, "student_sft_answer_only": 0.10}),
            _row("rationale_redi", 0, {"teacher": 0.25, "student_sft_rationale": 0.20, "student_sft_redi": 0.30}),
            _row("answer_only", 1, {"student_sft_answer_only": 0.20}),
            _row("rationale_redi", 1, {"student_sft_rationale": 0.30, "student_sft_redi": 0.30})]
    for i, r in enumerate(rows):
        (tmp_path / f"{i}.json").write_text(json.dumps(r))
    table = _split_row(write_cot_markdown(tmp_path, tmp_path / "t.md"))
    # recipe, overrides, split, student (as the recipe resolves it), seeds, teacher, before, answer-only, rationale,
    # +REDI, +KD (no such run), gap (rationale - answer-only, the larger seed std), kept
    assert table[2:13] == ["test (held-out questions)", "smollm2-135m-instruct", "2", "25.0%", "0.0%",
                           "15.0 ± 7.1%", "25.0 ± 7.1%", "30.0 ± 0.0%", "—", "+10.0 (7.1)", "3/8"]
    (tmp_path / "3.json").unlink()  # seed 1's rationale run not done yet: the seeds column says so
    table = _split_row(write_cot_markdown(tmp_path, tmp_path / "t.md"))
    assert table[4:10] == ["2 answer_only, 1 rationale_redi", "25.0%", "0.0%", "15.0 ± 7.1%", "20.0%", "30.0%"]


def test_cot_table_has_a_row_per_split_and_the_teachers_checkpoint(tmp_path):
    teacher = {"recipe": "cot-chainsum-teacher", "sha256": "ab" * 32, "command": "kdkit train recipe=t",
               "accuracy": {"teacher": 0.9, "teacher@hard": 0.7}, "stage_seconds": {"sft": 100.0, "eval": 20.0}}
    for i, (variant, acc) in enumerate([("answer_only", {"student_sft_answer_only": 0.1,
                                                         "student_sft_answer_only@hard": 0.05}),
                                        ("rationale_kd", {"student_sft_rationale": 0.5,
                                                          "student_sft_rationale@hard": 0.2})]):
        row = {**_row(variant, 0, {**acc, "teacher": 0.9, "teacher@hard": 0.7}), "data": "chain_sum",
               "teacher_run": teacher, "stage_seconds": {"sft": 10.0 * (i + 1)}, "wall_seconds": 60.0 * (i + 1)}
        (tmp_path / f"{i}.json").write_text(json.dumps(row))
    text = write_cot_markdown(tmp_path, tmp_path / "t.md", data="chain_sum").read_text()
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| cot-math-small | ``")]
    assert [r[2].split(" ")[0] for r in rows] == ["test", "hard", "1", "answer_only", "rationale_kd"]
    assert rows[2][3:6] == ["2", "3", "5 |"]  # whole bench, minutes: teacher 100 + 20 s, student runs 60 + 120 s
    assert rows[0][5:12] == ["90.0%", "—", "10.0%", "—", "—", "50.0%", "—"]  # KD's column reads its own runs
    assert rows[1][5:12] == ["70.0%", "—", "5.0%", "—", "—", "20.0%", "—"]
    assert "`abababababababab`" in text and "test 90.0%, hard 70.0%" in text and "| 120 |" in text
    assert rows[4][3] == "sft 20 |"
    assert write_cot_markdown(tmp_path, tmp_path / "g.md").read_text().count("| cot-math-small") == 0  # gsm8k


def test_unknown_benchmark_names_the_choices(capsys):
    from kdkit.cli import BENCHMARKS, main

    assert main(["bench", "nope"]) != 0
    err = capsys.readouterr().err
    assert "unknown benchmark 'nope'" in err and all(name in err for name in [*BENCHMARKS, "classifier-table"])


@pytest.mark.parametrize("settings, message", [
    (["seeds=0"], "seeds=0 is not allowed: expected an integer >= 1"),
    (["cot.samples=0"], "cot.samples=0 is not allowed"),  # a recipe override, checked before the first run
    (["recipe=demo-kd"], "task: cot recipes"),
    (["cot.generations=/nonexistent"], "cot.generations='/nonexistent' is not allowed"),
])
def test_bench_cot_refuses_bad_options_and_overrides_before_any_run(settings, message, tmp_path, monkeypatch):
    from kdkit.bench import cot

    started = []
    monkeypatch.setattr(cot, "run_kdkit", lambda args: started.append(args))
    with pytest.raises(ConfigError, match=message):
        cot.run_cot([*settings, f"runs={tmp_path / 'runs'}", f"out={tmp_path / 'out'}"])
    assert not started and list(tmp_path.iterdir()) == []


def test_cot_bench_plans_each_run_once_and_reuses_the_teacher_and_its_rationales(tmp_path, monkeypatch):
    """The bench's orchestration with `kdkit` runs faked: the teacher recipe runs first and every student run
    gets its checkpoint; the rationales generated by the first run that makes them are reused by the rest; a
    scratch student is never evaluated before training; one result file per run, and the table."""
    import kdkit.bench.cot as cot

    calls = []

    def fake_run(args):
        calls.append(args)
        opts = dict(a.split("=", 1) for a in args[1:] if "=" in a)
        run = Path(opts["output_dir"]) / opts["name"]
        run.mkdir(parents=True)
        if args[0] == "train":
            (run / "sft" / "model").mkdir(parents=True)
            (run / "sft" / "model" / "model.safetensors").write_bytes(b"weights")
            acc = {"student_sft_reference": {"accuracy": 0.9}, "student_sft_reference@hard": {"accuracy": 0.4}}
        else:
            if opts.get("cot.sft") == "rationale" and "cot.generations" not in opts:
                (run / "generate" / "rationales").mkdir(parents=True)
            acc = {"student_sft_" + opts["cot.sft"]: {"accuracy": 0.5}}
        (run / "report.json").write_text(json.dumps({"accuracy": acc, "data": "chain_sum",
                                                     "stage_seconds": {"sft": 1.0}}))
        return [sys.executable, "-m", "kdkit.cli", *args], 2.0

    monkeypatch.setattr(cot, "run_kdkit", fake_run)
    rows = cot.run_cot([f"runs={tmp_path / 'runs'}", "seeds=2", f"out={tmp_path / 'results'}"])
    assert calls[0][:2] == ["train", "recipe=cot-chainsum-teacher"]
    student_runs = calls[1:]
    assert len(rows) == len(student_runs) == 2 * len(cot.VARIANTS)
    teacher = f"teacher.model={tmp_path / 'runs' / 'cot-chainsum-teacher' / 'sft' / 'model'}"
    assert all(teacher in c and "cot.eval_student_before=false" in c and "cot.eval_teacher=false" in c
               for c in student_runs)
    first = next(c for c in student_runs if "cot.sft=rationale" in c)
    reuse = f"cot.generations={tmp_path / 'runs' / 'cot-chainsum__rationale_redi__s0'}"
    assert reuse not in first and all(reuse in c for c in student_runs if "cot.sft=rationale" in c and c is not first)
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == sorted(
        f"cot-chainsum__{v}__s{s}.json" for v in cot.VARIANTS for s in (0, 1))
    assert rows[0]["teacher_run"]["sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert rows[0]["accuracy"]["teacher@hard"] == {"accuracy": 0.4}
