"""The one training loop, shared by train-lm, train-diffusion (with EMA), LoRA and the masked-diffusion LM.

A task supplies the model's data and loss (see `Task`); the loop owns the optimizer, schedule, autocast,
accumulation, clipping, evaluation, metrics, checkpoint/resume, Ctrl-C, the NaN stop, DDP and FSDP2.
"""

from gentool.train.ema import ema_update, make_ema
from gentool.train.loop import Task, TrainConfig, TrainResult, train
from gentool.train.schedules import SCHEDULES, lr_at

__all__ = ["SCHEDULES", "Task", "TrainConfig", "TrainResult", "ema_update", "lr_at", "make_ema", "train"]
