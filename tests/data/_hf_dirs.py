"""Byte-level BPE tokenizer directories with each way of saying whether text starts with BOS (tests/data/test_bos.py,
tests/evaluation/test_bos_windows.py, tests/gguf/test_gguf_bos.py)."""

import json

TEXT = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer"]


def hf_dir(path, *, post: str | None, add_bos_token=None):
    """A byte-level BPE tokenizer.json with the given post-processor ("template": BOS $A, "bytelevel", or none)
    and a tokenizer_config.json with or without add_bos_token."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|bos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT * 20, trainer)
    if post == "template":
        tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                                           special_tokens=[("<|bos|>", 1)])
    elif post == "bytelevel":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|endoftext|>"}
    if add_bos_token is not None:
        cfg["add_bos_token"] = add_bos_token
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path
