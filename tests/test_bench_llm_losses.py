"""`kdkit bench llm-losses`: every row's recipe validates, and the table reads its result files (mean ± std over
seeds, the gap to the CE-only row judged against the larger seed spread)."""
import json

import pytest

from kdkit.bench.llm_losses import RECIPE, ROWS, write_markdown
from kdkit.config import load_recipe


@pytest.mark.parametrize("row", list(ROWS))
def test_every_row_is_a_valid_recipe(row):
    verb, store, extra = ROWS[row]
    args = [*extra, *(["teacher.cache=.", "teacher.model=null"] if store else [])]
    recipe = load_recipe(RECIPE, args)
    assert recipe.task == "lm" and (verb == "train") == (not recipe.losses or all(v is None for v in
                                                                                 recipe.losses.values()))


def test_table_from_result_files(tmp_path):
    setting = {"recipe": RECIPE, "overrides": []}
    hw = {"device": "cpu", "cpu": "test"}
    ppl = {"ce": [40.0, 41.0], "fkl": [35.0, 35.4], "rkl": [40.2, 40.9], "jsd": [38.0]}
    for row, values in ppl.items():
        for seed, p in enumerate(values):
            (tmp_path / f"{row}-{seed}.json").write_text(json.dumps({
                "row": row, "seed": seed, "setting": setting, "hardware": hw, "command": "kdkit bench llm-losses",
                "student_ppl": p, "teacher_ppl": 12.0, "top1_agreement": 0.3 + seed / 100, "train_tokens": 1000,
                "train_seconds": 5.0}))
    text = write_markdown(tmp_path, tmp_path / "t.md").read_text()
    assert "| fkl | 2 | 35.20 ± 0.28 | 0.3050 ± 0.0071 | -5.30 |" in text
    assert "| rkl | 2 | 40.55 ± 0.49 | 0.3050 ± 0.0071 | +0.05 (within noise) |" in text
    assert "| jsd | 1 | 38.00 | 0.3000 | -2.50 (one seed: not judged) |" in text  # no spread to judge a gap by
    assert text.index("| ce |") < text.index("| fkl |") < text.index("| rkl |") < text.index("| jsd |")
    assert "Teacher perplexity on the same blocks: 12.00." in text


@pytest.mark.parametrize("given", ["rows=ce,fkl", "rows=[ce, fkl]"])
def test_rows_take_a_comma_list_or_a_list(given):
    from kdkit.bench.llm_losses import LLMLossesBench
    from kdkit.bench.results import bench_options, name_list

    opts, rest = bench_options(LLMLossesBench, [given, "seeds=1", "llm.block_size=128"], passthrough=True)
    assert name_list(opts.rows, "rows", tuple(ROWS)) == ["ce", "fkl"] and rest == ["llm.block_size=128"]
