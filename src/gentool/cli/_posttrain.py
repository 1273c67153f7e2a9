"""train-lm's post-training options (gentool.lm.sft, gentool.lm.preference) and Muon's per-group learning rates,
kept here so train_lm.py stays thin."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

POST = "Post-training (SFT and preference tuning)"
OPTIM = "Optimizer and schedule"

EmbedLr = Annotated[Optional[float], typer.Option(min=0, max=10, help="Muon runs: AdamW's peak rate on the embeddings "
                                                  "(default 3e-2).", rich_help_panel=OPTIM)]
HeadLr = Annotated[Optional[float], typer.Option(min=0, max=10, help="Muon runs: AdamW's peak rate on an untied output "
                                                 "head (default 1e-2).", rich_help_panel=OPTIM)]

Objective = Annotated[Optional[str], typer.Option(
    "--objective", help="sft (masked example shards: the default for them), or dpo, ipo, simpo, orpo on preference "
                        "pairs.",
    rich_help_panel=POST)]
Beta = Annotated[float, typer.Option(min=0, max=100, help="Preference loss temperature β.", rich_help_panel=POST)]
LabelSmoothing = Annotated[float, typer.Option(min=0, max=0.5, help="dpo: robust DPO's label-noise rate ε; simpo: "
                                                                    "label smoothing.", rich_help_panel=POST)]
SimpoGamma = Annotated[float, typer.Option(min=0, max=100, help="SimPO's target reward margin γ.",
                                           rich_help_panel=POST)]
ReferenceLive = Annotated[bool, typer.Option(help="dpo/ipo: reference log-probs in every step (LoRA: adapters off; "
                                                  "full: a frozen copy), not precomputed once.", rich_help_panel=POST)]


def objective(tokens, name, beta, label_smoothing, simpo_gamma, reference_live):
    from gentool.lm.preference import objective_for

    return objective_for(tokens, name, beta=beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma,
                         reference_live=reference_live)
