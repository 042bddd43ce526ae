"""The embedded default LM of instruction tuning: a small Llama-architecture causal LM, pretrained on the
synthetic captions' text as a task on the pretraining engine (python -m pretrain.caption_lm)."""
