"""Diffusion language models, all in one place: masked diffusion (MDLM, masked.py), block diffusion (BD3-LM,
block.py), their samplers (samplers.py) and checkpoints at work (serve.py: perplexity and sampling)."""
