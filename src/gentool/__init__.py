"""gentool: single-purpose command-line tools for generative-model experiments."""

__version__ = "0.1.0"
