"""The CoT comparison in miniature: on chain sums, a small student trained on rationales answers more held-out
questions than the same student trained on the answers alone, averaged over 2 seeds.

The rationales are the dataset's own step-by-step ones (a perfect teacher's: `kdkit train` with cot.sft=reference),
the baseline is `kdkit distill` with cot.sft=answer_only; both run the real pipeline (TRL SFT, greedy evaluation)
on the same 2,000 questions with the same budget. The student is a 2-layer, 128-wide Llama over a character
vocabulary (so that it trains in about a minute); the full-size comparison is `kdkit bench cot`."""
import json

import pytest
import torch

from kdkit.cli import main

pytest.importorskip("reasoning_gym")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


@pytest.fixture(scope="module")
def char_student(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<pad>", "<|im_start|>", "<|im_end|>"]
    chars = "0123456789+-=\n .:,?!'" + "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    vocab = {t: i for i, t in enumerate(special + sorted(set(chars)) + ["<unk>"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                   bos_token="<|im_start|>", unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, bos_token_id=fast.bos_token_id,
                      eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, tie_word_embeddings=True,
                      max_position_embeddings=512)
    out = tmp_path_factory.mktemp("char_student")
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    fast.save_pretrained(str(out))
    assert fast.decode(fast("4 - 7 = -3").input_ids) == "4 - 7 = -3"
    return out


def test_rationale_sft_beats_answer_only_sft_over_two_seeds(char_student, tmp_path):
    common = ["cot.train_questions=2000", "cot.test_questions=200", "cot.eval_splits=[test]", "data.batch_size=8",
              "optim.lr=2e-3", "cot.sft_epochs=3", "trainer.threads=1", "trainer.progress=false",
              "cot.eval_max_new_tokens=64", "cot.instruction=''", "trainer.mixed_precision='no'",
              f"output_dir={tmp_path}"]
    rationale, answers = [], []
    for seed in (0, 1):
        assert main(["train", "recipe=cot-chainsum-teacher", f"student.model={char_student}", *common,
                     f"trainer.seed={seed}", f"name=rationale{seed}"]) == 0
        assert main(["distill", "recipe=cot-chainsum", f"teacher.model={char_student}",
                     f"student.model={char_student}", "student.options={}", "cot.sft=answer_only", "cot.redi=false",
                     "cot.eval_teacher=false", "cot.eval_student_before=false", *common, f"trainer.seed={seed}",
                     f"name=answers{seed}"]) == 0
        rationale.append(json.loads((tmp_path / f"rationale{seed}" / "metrics.json").read_text())
                         ["summary"]["student_sft_reference"])
        answers.append(json.loads((tmp_path / f"answers{seed}" / "metrics.json").read_text())
                       ["summary"]["student_sft_answer_only"])
    # measured on this machine: rationale 0.17 / 0.13, answers 0.09 / 0.09 (200 questions each)
    assert sum(rationale) / 2 > sum(answers) / 2 + 0.03, (rationale, answers)
