"""The bench harness shared by `kdkit bench llm|cot`: option splitting, and tables built only from result files."""
import json

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


def test_cot_table_means_over_seeds_and_reads_each_eval_from_the_run_that_made_it(tmp_path):
    rows = [_row("answer_only", 0, {"student_before": 0.0, "student_sft_answer_only": 0.10}),
            _row("rationale_redi", 0, {"teacher": 0.25, "student_sft_rationale": 0.20, "student_sft_redi": 0.30}),
            _row("answer_only", 1, {"student_sft_answer_only": 0.20}),
            _row("rationale_redi", 1, {"student_sft_rationale": 0.30, "student_sft_redi": 0.30})]
    for i, r in enumerate(rows):
        (tmp_path / f"{i}.json").write_text(json.dumps(r))
    table = write_cot_markdown(tmp_path, tmp_path / "t.md").read_text().splitlines()[-1].split(" | ")
    # recipe, overrides, student (as the recipe resolves it), seeds, teacher, before, answer-only, rationale, +REDI, kept
    assert table[2:10] == ["truncated-teacher (15 layers)", "2", "25.0%", "0.0%", "15.0 ± 7.1%", "25.0 ± 7.1%", "30.0 ± 0.0%", "3/8"]
    (tmp_path / "3.json").unlink()  # seed 1's rationale run not done yet: the seeds column says so
    table = write_cot_markdown(tmp_path, tmp_path / "t.md").read_text().splitlines()[-1].split(" | ")
    assert table[3:9] == ["2 answer-only, 1 rationale", "25.0%", "0.0%", "15.0 ± 7.1%", "20.0%", "30.0%"]


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
