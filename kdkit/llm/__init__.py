"""Causal-LM distillation: models, text data, token KD trainer, teacher-signal store, on-policy and cross-tokenizer KD."""
