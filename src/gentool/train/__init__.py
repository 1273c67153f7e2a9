"""The one training loop, shared by train-lm, train-diffusion and the masked-diffusion LM."""

from gentool.train.loop import Task, TrainConfig, train

__all__ = ["Task", "TrainConfig", "train"]
