"""Classifier and LM distillation on the one Run: Ctrl-C writes a checkpoint and exits 130, `kill -9` loses only
the steps since the last checkpoint, and `resume=auto` ends bit for bit where an uninterrupted run ends; resuming
with a changed training setting is refused before anything is written."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO
from kdkit import checkpoint as ckpt
from kdkit.cli import main


def _weights(path) -> dict:
    return ckpt.read_safetensors(path)[0]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _kill_after_first_checkpoint(argv: list[str], run_dir, timeout: float = 300) -> int:
    """Run `kdkit ARGV` in a fresh process and SIGKILL it as soon as its first checkpoint is complete; returns
    that checkpoint's step."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "kdkit.cli", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not ckpt.checkpoint_folders(run_dir):
            if proc.poll() is not None:
                raise AssertionError(f"the run ended before its first checkpoint: {proc.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("no checkpoint within the time limit")
            time.sleep(0.001)
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    return int(ckpt.checkpoint_folders(run_dir)[0].name.removeprefix("step-"))


@pytest.fixture
def one_thread():
    """The runs below pin one thread (`trainer.threads=1`), in this process as in the killed one."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def random_teacher(tmp_path_factory):
    """A ConvNet-3 teacher checkpoint with random weights (what the resume tests need is a fixed teacher)."""
    from kdkit.models import build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "model.safetensors"
    ckpt.save_model(build_model("convnet3", width=8), path,
                    {"model": "convnet3", "num_classes": 10, "options": json.dumps({"width": 8}), "dataset": "cifar10"})
    return path


def _kd_args(tmp_path, teacher, name: str) -> list[str]:
    """A tiny `kdkit distill`: 200 CIFAR-10 images, 10 steps per epoch, 6 epochs, grad_accum 2, a checkpoint
    every 2 steps."""
    return ["distill", "recipe=demo-kd", f"output_dir={tmp_path}", f"name={name}", f"teacher.checkpoint={teacher}",
            "student.options={width: 8}", "data.train_per_class=20", "data.batch_size=20", "trainer.epochs=6",
            "trainer.grad_accum=2", "trainer.save_every_steps=2", "trainer.keep_checkpoints=100", "data.test_limit=50",
            "data.eval_batch_size=50", "trainer.progress=false", "trainer.threads=1"]


def test_kill_9_then_ctrl_c_then_resume_is_bit_exact_and_changed_settings_are_refused(
        tmp_path, random_teacher, one_thread, monkeypatch, capsys):
    from kdkit.train.distiller import Distiller

    assert main(_kd_args(tmp_path, random_teacher, "full")) == 0
    capsys.readouterr()
    args = _kd_args(tmp_path, random_teacher, "broken")
    run_dir = tmp_path / "broken"
    killed_at = _kill_after_first_checkpoint(args, run_dir)
    assert 2 <= killed_at < 60

    # Ctrl-C in the middle of an accumulation (odd step): a checkpoint at that step, one line, exit code 130
    stop = killed_at + 5
    step = Distiller.step

    def ctrl_c_at_stop(self, item):
        logs = step(self, item)
        if item[0] + 1 == stop:
            os.kill(os.getpid(), signal.SIGINT)
        return logs

    monkeypatch.setattr(Distiller, "step", ctrl_c_at_stop)
    assert main([*args, "resume=auto"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"kdkit: interrupted at step {stop};") and "resume=auto" in err[0]
    assert ckpt.latest_checkpoint(run_dir).name == f"step-{stop:08d}"
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))["method"]["grads"] is not None
    monkeypatch.setattr(Distiller, "step", step)

    # a changed training setting is refused, naming old and new values, before anything is written
    config = (run_dir / "config.yaml").read_bytes()
    for change, words in (("optim.lr=0.1", "optim.lr: 0.05 -> 0.1"), ("losses.kd.T=2", "losses.kd.T: 4.0 -> 2.0")):
        assert main([*args, "resume=auto", change]) == 2
        err = capsys.readouterr().err
        assert words in err and err.startswith("kdkit: error: resume:"), err
    assert (run_dir / "config.yaml").read_bytes() == config
    assert main([*args, "resume=auto", "trainer.eval_every=2"]) == 0  # evaluation settings may change

    assert _same(_weights(run_dir / "model.safetensors"), _weights(tmp_path / "full" / "model.safetensors"))
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())["summary"]
    resumed = json.loads((run_dir / "metrics.json").read_text())["summary"]
    assert resumed["final_acc"] == full["final_acc"] and resumed["steps"] == full["steps"] == 60


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A 2-layer Llama with random weights and a 300-token BPE trained on GSM8K text, saved as a model folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from kdkit.llm.text_data import load_texts

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(load_texts("gsm8k", "train", limit=300), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, bos_token_id=None))
    out = tmp_path_factory.mktemp("tiny-lm")
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def test_lm_run_killed_with_sigkill_resumes_bit_exact(tmp_path, tiny_lm, one_thread):
    args = ["distill", "recipe=smollm2-kd-small", f"output_dir={tmp_path}", f"teacher.model={tiny_lm}",
            "student.options={layers: 1}", "llm.block_size=32", "llm.train_examples=60", "llm.eval_examples=4",
            "llm.max_steps=120", "llm.eval_every_steps=40", "data.batch_size=2", "data.eval_batch_size=8",
            "trainer.grad_accum=2", "trainer.save_every_steps=4", "trainer.keep_checkpoints=100",
            "trainer.progress=false", "trainer.threads=1"]
    assert main([*args, "name=full"]) == 0
    killed_at = _kill_after_first_checkpoint([*args, "name=broken"], tmp_path / "broken")
    assert 4 <= killed_at < 120
    assert main([*args, "name=broken", "resume=auto"]) == 0
    a = _weights(tmp_path / "full" / "student" / "model.safetensors")
    b = _weights(tmp_path / "broken" / "student" / "model.safetensors")
    assert _same(a, b)
    hist = [json.loads((tmp_path / n / "metrics.json").read_text())["history"] for n in ("full", "broken")]
    assert [h["test_ppl"] for h in hist[0]] == [h["test_ppl"] for h in hist[1]]
