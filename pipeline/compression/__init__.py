"""Making a trained student smaller: structured pruning and torch dynamic INT8 quantization."""
