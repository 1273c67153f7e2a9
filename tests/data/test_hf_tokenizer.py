import json

import pytest

tokenizers = pytest.importorskip("tokenizers")

from gentool.data.hf_tokenizer import HFTokenizer  # noqa: E402
from gentool.errors import GentoolError  # noqa: E402

TEXT = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer",
        "The slings and arrows of outrageous fortune,", "Or to take arms against a sea of troubles — ünïcödé 🙂"]


def _byte_level_dir(tmp_path, add_bos=True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|bos|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT * 20, trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|endoftext|>",
           "add_bos_token": add_bos, "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
           "{{ m['content'] }}<|endoftext|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
           "{% endif %}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.oracle
@pytest.mark.parametrize("add_bos", [True, False])
def test_encoding_equals_transformers_autotokenizer(tmp_path, add_bos):
    transformers = pytest.importorskip("transformers")
    d = _byte_level_dir(tmp_path, add_bos)
    ours = HFTokenizer(d)
    ref = transformers.AutoTokenizer.from_pretrained(d)
    for text in TEXT + ["  leading spaces", "", "<|im_start|>user\nhi<|endoftext|>"]:
        assert ours.encode_default(text) == ref(text)["input_ids"], text
        ids = ours.encode(text)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    msgs = [{"role": "user", "content": "hello"}]
    assert ours.apply_chat_template(msgs) == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_round_trip_and_special_ids(tmp_path):
    ours = HFTokenizer(_byte_level_dir(tmp_path))
    assert ours.bos_id == 1 and ours.eos_id == 0 and ours.vocab_size >= 256
    for text in TEXT:
        assert ours.decode(ours.encode(text)) == text
    assert ours.encode("hi", bos=True, eos=True)[0] == 1 and ours.encode("hi", eos=True)[-1] == 0
    assert ours.sha256.startswith("sha256:")


def test_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(GentoolError, match="cannot read tokenizer.json"):
        HFTokenizer(tmp_path)
