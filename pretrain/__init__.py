"""Everything after a batch exists: the model library, losses, and the DeepSpeed training application."""
