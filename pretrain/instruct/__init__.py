"""Instruction tuning of a multimodal LM (our image encoder + projector + a causal LM) on the pretraining engine."""
