"""Teacher generation backends in the main env: the transformers backend on a tiny random Llama with SmolLM2's
tokenizer (fast, exact references from plain `model.generate`) and on the real SmolLM2-135M-Instruct; errors;
the vLLM backend's absence; the generation benchmark's plumbing. The vLLM backend itself is tested for real in
its own environment by `tests_vllm/` (run by `make test` with `.venv-vllm/bin/python`)."""
import copy
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdkit.errors import ConfigError
from kdkit.llm.generation import (Completion, EmptyGenerationError, GenerationBackend, SamplingSpec,
                                  VLLMNotInstalledError, chat_prompt, encode_prompt, make_backend, summarize)
from kdkit.llm.generation_hf import TransformersBackend
from kdkit.llm.models import load_tokenizer, resolve_lm

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

REPO = Path(__file__).resolve().parents[1]
SMOL = "smollm2-135m-instruct"
PROMPTS = ["Hi", "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May.",
           "What is 7 times 8?", "Weng earns $12 an hour for babysitting. Yesterday she did 50 minutes of it.",
           "A robe takes 2 bolts of blue fiber"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 2-layer random Llama over SmolLM2's real 49,152-token vocabulary and tokenizer, saved as a folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(SMOL)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, initializer_range=0.5)
    out = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return make_backend("transformers", str(tiny_dir), dtype="float32", batch_size=2)


def reference_tokens(backend, prompt: str, max_new_tokens: int) -> list[int]:
    """Greedy new tokens of one unpadded prompt with plain `model.generate` (no stop strings, EOS disabled)."""
    ids = backend.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = backend.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=backend.pad_id)
    new = out[0, ids.shape[1]:].tolist()
    assert len(new) == max_new_tokens
    return new


def decode(backend, tokens):
    return backend.tokenizer.decode(tokens, skip_special_tokens=True)


# ------------------------------------------------------------------ transformers backend, tiny random Llama


def test_backend_satisfies_the_protocol(tiny):
    assert isinstance(tiny, GenerationBackend) and tiny.name == "transformers"


def test_order_kept_under_length_sorted_batching(tiny):
    spec = SamplingSpec(temperature=0, max_new_tokens=6)
    batched = tiny.generate(PROMPTS, spec)  # batch_size=2: sorted by length, left-padded, put back in order
    single = TransformersBackend.from_model(tiny.model, tiny.tokenizer, batch_size=1)
    alone = [single.generate([p], spec)[0] for p in PROMPTS]
    assert [r[0].text for r in batched] == [r[0].text for r in alone]
    assert len({r[0].text for r in batched}) == len(PROMPTS)  # distinct answers: a permutation would show
    for p, r in zip(PROMPTS, batched):  # and each equals plain generate on that prompt alone
        assert r[0].text == decode(tiny, reference_tokens(tiny, p, 6))
        assert (r[0].num_tokens, r[0].finish_reason) == (6, "length")


def test_n_completions_per_prompt_seeded_and_rng_untouched(tiny):
    spec = SamplingSpec(n=3, temperature=1.0, max_new_tokens=5, seed=7)
    state = torch.random.get_rng_state()
    a = tiny.generate(PROMPTS[:4], spec)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG stream is left alone
    assert [len(r) for r in a] == [3, 3, 3, 3]
    assert all(c.num_tokens == 5 and c.finish_reason == "length" for r in a for c in r)
    assert all(len({c.text for c in r}) > 1 for r in a)  # real samples, not one answer copied
    b = tiny.generate(PROMPTS[:4], spec)
    assert [[c.text for c in r] for r in a] == [[c.text for c in r] for r in b]
    c = tiny.generate(PROMPTS[:4], SamplingSpec(n=3, temperature=1.0, max_new_tokens=5, seed=8))
    assert [[x.text for x in r] for r in a] != [[x.text for x in r] for r in c]


def test_greedy_is_deterministic_and_n_copies(tiny):
    spec = SamplingSpec(n=3, temperature=0, max_new_tokens=6)
    a, b = tiny.generate(PROMPTS[:3], spec), tiny.generate(PROMPTS[:3], spec)
    assert a == b and all(len(r) == 3 and len({c.text for c in r}) == 1 for r in a)


def test_top_p_near_zero_is_greedy(tiny):
    # nucleus sampling with p -> 0 keeps only the most likely token: sampling must then reproduce greedy exactly
    # (it would not if a top-k or a model default were mixed in, or if top_p were ignored)
    greedy = tiny.generate(PROMPTS[:3], SamplingSpec(temperature=0, max_new_tokens=6))
    nucleus = tiny.generate(PROMPTS[:3], SamplingSpec(temperature=1.0, top_p=1e-6, max_new_tokens=6, seed=3))
    assert [r[0].text for r in greedy] == [r[0].text for r in nucleus]


@pytest.mark.parametrize("pad", ["eos", "distinct"])
def test_stop_strings_cut_text_and_count_tokens(tiny, pad):
    backend = tiny
    if pad == "distinct":  # padding with a token that is not EOS: finished rows end in a pad-only suffix
        tok = copy.deepcopy(tiny.tokenizer)
        tok.pad_token = "<|endoftext|>"
        backend = TransformersBackend.from_model(tiny.model, tok, batch_size=2)
        assert backend.pad_id not in backend.eos_ids
    prompts = PROMPTS[1:3]
    refs = [reference_tokens(backend, p, 12) for p in prompts]
    full = decode(backend, refs[0])
    start = len(decode(backend, refs[0][:4]))
    stop = full[start:start + 3]  # a piece of the first prompt's answer, from its 5th token on
    assert stop
    out = backend.generate(prompts, SamplingSpec(temperature=0, max_new_tokens=12, stop=[stop, "never-said"]))
    for ref, row in zip(refs, out):
        text = decode(backend, ref)
        c = row[0]
        if stop in text:
            expected_tokens = next(j for j in range(1, 13) if stop in decode(backend, ref[:j]))
            assert (c.text, c.num_tokens, c.finish_reason) == (text[:text.find(stop)], expected_tokens, "stop")
            assert stop not in c.text
        else:
            assert (c.text, c.num_tokens, c.finish_reason) == (text, 12, "length")
    assert out[0][0].finish_reason == "stop" and out[0][0].num_tokens <= 5


def test_max_new_tokens_and_eos_finish(tiny):
    ref = reference_tokens(tiny, PROMPTS[2], 10)
    # make the token first generated at position j the model's EOS: generation must stop there, EOS not in text
    j = next(j for j in range(2, 10) if ref[j] not in ref[:j])
    model = copy.deepcopy(tiny.model)
    model.generation_config.eos_token_id = ref[j]
    backend = TransformersBackend.from_model(model, tiny.tokenizer, batch_size=2)
    row = backend.generate([PROMPTS[2], PROMPTS[2] + " and"], SamplingSpec(temperature=0, max_new_tokens=10))[0]
    assert (row[0].text, row[0].num_tokens, row[0].finish_reason) == (decode(tiny, ref[:j]), j + 1, "stop")
    short = tiny.generate([PROMPTS[2]], SamplingSpec(temperature=0, max_new_tokens=3))[0][0]
    assert (short.text, short.num_tokens, short.finish_reason) == (decode(tiny, ref[:3]), 3, "length")


def test_empty_generations_are_reported(tiny, caplog):
    prompts = PROMPTS[:2]
    full = [r[0].text for r in tiny.generate(prompts, SamplingSpec(temperature=0, max_new_tokens=6))]
    first = full[0][0]
    assert not full[1].startswith(first)
    with caplog.at_level(logging.WARNING, logger="kdkit.llm.generation"):
        out = tiny.generate(prompts, SamplingSpec(temperature=0, max_new_tokens=6, stop=[first]))
    assert out[0][0].text == "" and out[0][0].empty and out[0][0].finish_reason == "stop"
    assert out[0][0].num_tokens >= 1 and not out[1][0].empty
    assert "1 of 2 completions are empty (prompts 0)" in caplog.text
    stats = summarize(out)
    assert (stats.prompts, stats.completions, stats.empty, stats.empty_prompts) == (2, 2, 1, [0])
    with pytest.raises(EmptyGenerationError, match="all 2 completions are empty.*stop string"):
        tiny.generate(prompts, SamplingSpec(temperature=0, max_new_tokens=6, stop=[first, full[1][0]]))


def test_bad_input_errors(tiny):
    spec = SamplingSpec(temperature=0, max_new_tokens=2)
    assert tiny.generate([], spec) == []
    with pytest.raises(ConfigError, match="one string"):
        tiny.generate("Hi", spec)
    with pytest.raises(ConfigError, match=r"prompts \[1\] are empty"):
        tiny.generate(["Hi", ""], spec)
    for bad, match in (({"n": 0}, "n "), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                       ({"max_new_tokens": 0}, "max_new_tokens"), ({"stop": ["a", ""]}, "stop")):
        with pytest.raises(ConfigError, match=match):
            SamplingSpec(**bad)
    assert SamplingSpec(stop="\n\n").stop == ["\n\n"]


def test_make_backend_errors(monkeypatch, tiny_dir):
    with pytest.raises(ConfigError, match="unknown generation backend 'vlm'; choices: transformers, vllm"):
        make_backend("vlm", SMOL)
    with pytest.raises(ConfigError, match="unknown dtype 'fp8'"):
        make_backend("transformers", str(tiny_dir), dtype="fp8")
    import kdkit.llm.generation_vllm as gv

    if gv.vllm_available():  # the main env has no vllm; where it has, check the message path all the same
        monkeypatch.setattr(gv, "vllm_available", lambda: False)
    with pytest.raises(VLLMNotInstalledError, match=r"make vllm-env.*\.venv-vllm.*pip install vllm"):
        make_backend("vllm", SMOL)


# ------------------------------------------------------------------ chat_prompt and the real SmolLM2


def test_chat_prompt_and_its_errors(tiny_dir):
    tok = load_tokenizer(SMOL)
    assert chat_prompt(tok, "What is 2+3?", system="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")
    assert chat_prompt(tok, "Hi").startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    with pytest.raises(ConfigError, match="user text is empty"):
        chat_prompt(tok, "  ")
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        chat_prompt(plain, "Hi")


def test_smollm2_answers_and_stops_at_eos():
    backend = make_backend("transformers", SMOL, dtype="float32", batch_size=4)
    prompt = chat_prompt(backend.tokenizer, "What is 2+3?")
    ids = encode_prompt(backend.tokenizer, prompt)
    assert ids.count(backend.tokenizer.bos_token_id) == 3  # the template's own <|im_start|>s, no extra BOS
    out = backend.generate([prompt], SamplingSpec(temperature=0, max_new_tokens=40))
    # "2 + 3 = 5" is 7 tokens, then <|im_end|> (EOS), counted as generated
    assert out == [[Completion("2 + 3 = 5", 8, "stop")]]
    # tokens "2", " +", " ", "3", " =": the 5th completes the stop string, which is cut from the text
    cut = backend.generate([prompt], SamplingSpec(temperature=0, max_new_tokens=40, stop=[" ="]))
    assert cut == [[Completion("2 + 3", 5, "stop")]]


# ------------------------------------------------------------------ the vLLM suite runs in its own env


def test_make_test_runs_the_vllm_suite_in_its_env():
    make = (REPO / "Makefile").read_text()
    recipe = make.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "vllm-env" in recipe.splitlines()[0] and "$(VLLM_BIN)/python -m pytest" in recipe and "tests_vllm" in recipe


def test_vllm_suite_fails_loudly_outside_its_env():
    # run from the main env, the vLLM tests must not be collected and skipped: they error, naming the env
    import kdkit.llm.generation_vllm as gv

    if gv.vllm_available():
        pytest.skip("vllm is importable here, so the vLLM suite would really run")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests_vllm"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and ".venv-vllm" in proc.stdout + proc.stderr


# ------------------------------------------------------------------ benchmark


def test_generation_markdown_from_result_files(tmp_path):
    from kdkit.bench.generation import write_generation_markdown

    setting = {"model": SMOL, "prompts": 8, "dataset": "gsm8k/test", "n": 4, "temperature": 0.7, "top_p": 1.0,
               "max_new_tokens": 32, "seed": 0, "dtype": "float32", "threads": 2}
    hw = {"device": "cpu", "cpu": "Test CPU"}
    for i, (backend, tps) in enumerate((("transformers", 50.0), ("vllm", 80.0), ("vllm", 150.0))):
        (tmp_path / f"{i}.json").write_text(json.dumps({
            "backend": backend, "setting": setting, "tokens_per_s": tps, "generated_tokens": 1024, "generate_s": 1.0,
            "load_s": 2.0, "finish": {"stop": 3, "length": 29}, "empty_completions": 0, "versions": {"torch": "x"},
            "hardware": hw, "command": "kdkit bench generation", "time": f"2026-01-01T00:00:0{i}"}))
    text = write_generation_markdown(tmp_path, tmp_path / "g.md").read_text()
    assert "| vllm | 150.0 |" in text and "| vllm | 80.0 |" not in text  # the latest run of each backend
    assert "**3.00×**" in text and "3/29" in text


def test_bench_generation_transformers_worker(tmp_path):
    from kdkit.bench.generation import run_generation

    rows = run_generation(["prompts=2", "n=2", "max_new_tokens=4", "backends=transformers", "threads=1",
                           f"out={tmp_path}"])
    (row,) = rows
    assert row["completions"] == 4 and row["generated_tokens"] <= 16 and row["tokens_per_s"] > 0
    saved = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert saved["backend"] == "transformers" and saved["setting"]["dataset"] == "gsm8k/test"
    assert saved["versions"]["torch"] == torch.__version__
    assert resolve_lm(SMOL).is_dir()


def test_bench_generation_times_a_cot_recipes_own_prompts(tmp_path, tiny_dir):
    """recipe=: the CoT recipe's training questions with its instruction, in the teacher's chat template, exactly
    the prompts its generate stage sends; model= replaces the recipe's teacher."""
    from kdkit.bench.generation import recipe_prompts, run_generation
    from kdkit.data import load_dataset_by_name

    model, prompts, dataset = recipe_prompts("cot-chainsum", str(tiny_dir), 3, "train")
    first = load_dataset_by_name("chain_sum", "train")["question"][0].strip()
    assert model == str(tiny_dir) and dataset == "chain_sum/train" and len(prompts) == 3
    assert f"{first}\nSolve the problem step by step." in prompts[0] and prompts[0].startswith("<|im_start|>")
    (row,) = run_generation(["recipe=cot-chainsum", f"model={tiny_dir}", "prompts=2", "n=1", "max_new_tokens=3",
                             "backends=transformers", "split=train", f"out={tmp_path}"])
    assert row["setting"]["dataset"] == "chain_sum/train" and row["setting"]["model"] == str(tiny_dir)
    assert row["completions"] == 2 and 0 < row["generated_tokens"] <= 6


def test_generation_uses_the_kv_cache_whatever_the_checkpoint_says(tiny_dir, tmp_path):
    """A checkpoint saved with use_cache=false (TRL's SFT leaves it so) still generates with the cache: same
    greedy text, and the model's forward sees past key values after the first step."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    m.config.use_cache = False
    m.generation_config.use_cache = False
    m.save_pretrained(str(tmp_path))
    from kdkit.llm.models import load_tokenizer

    load_tokenizer(str(tiny_dir)).save_pretrained(str(tmp_path))
    backend = make_backend("transformers", str(tmp_path), batch_size=2)
    seen = []
    hook = backend.model.register_forward_pre_hook(  # transformers 5 names it `cache`, 4 `past_key_values`
        lambda mod, args, kw: seen.append(kw.get("cache", kw.get("past_key_values"))), with_kwargs=True)
    backend.generate(["<|im_start|>user\n1 + 2?<|im_end|>\n<|im_start|>assistant\n"],
                     SamplingSpec(temperature=0, max_new_tokens=4))
    hook.remove()
    assert backend.model.generation_config.use_cache and any(p is not None and p.get_seq_length() > 0 for p in seen)
