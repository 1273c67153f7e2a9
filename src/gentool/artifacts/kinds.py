"""The artifact kinds and the format_version this gentool writes and reads."""

KINDS: dict[str, int] = {
    "tokenizer": 1,
    "token-shards": 1,
    "lm-checkpoint": 1,
    "lora-adapter": 1,
    "quantized-checkpoint": 1,
    "diffusion-checkpoint": 1,
    "samples": 1,
    "scale-fit": 1,
    "evaluation": 1,
}

PREFIX = "gentool."


def format_name(kind: str) -> str:
    assert kind in KINDS, f"unknown artifact kind {kind!r}"
    return PREFIX + kind


def kind_of(format_: str) -> str:
    return format_[len(PREFIX):] if format_.startswith(PREFIX) else format_
