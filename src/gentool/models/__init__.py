"""The shared model code: the transformer and its decode path, denoisers, LoRA and quantized layers, checkpoints."""
