"""Fine-tuning an exported pretraining run on a downstream task (retrieval, VQA), fully or with a PEFT method,
on the pretraining app's engine, loop, checkpoints and fault handling (see docs/finetuning.md)."""
