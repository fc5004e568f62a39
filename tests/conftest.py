"""Test environment: offline, the shared data beside the repo, a private writable cache, 2 threads."""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "KDKIT_DATA_DIR" not in os.environ and SHARED.is_dir():
    os.environ["KDKIT_DATA_DIR"] = str(SHARED)
os.environ.setdefault("KDKIT_CACHE_DIR", str(REPO / ".cache"))
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def cifar():
    """CIFAR-10 train and test splits as uint8 tensors (decoded once, then cached)."""
    from kdkit.data import load_cifar10

    return load_cifar10("train"), load_cifar10("test")


SMALL = ["trainer.progress=false", "data.test_limit=2000", "data.eval_batch_size=500"]


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory):
    """A small ConvNet teacher trained with `kdkit train` on 20,000 real CIFAR-10 images (shared by tests)."""
    from kdkit.cli import main

    out = tmp_path_factory.mktemp("teacher")
    rc = main(["train", "recipe=cifar10-240ep", f"output_dir={out}", "name=teacher", *SMALL,
               "student.model=convnet3", "student.options={width: 32}", "data.train_per_class=2000",
               "data.batch_size=128", "trainer.epochs=3", "scheduler.name=cosine", "optim.lr=0.05",
               "optim.weight_decay=5e-4"])
    assert rc == 0
    return out / "teacher"




@pytest.fixture
def one_thread():
    """One intra-op thread for tests of tiny tensors and models: they gain nothing from threads, and spinning
    OpenMP workers on a busy 2-core box make each op up to ~1000x slower. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A 2-layer random Llama over SmolLM2's vocabulary, tokenizer and chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdkit.llm.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("tiny_cot")
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out
