"""Chat templates: render a conversation as `transformers`' `apply_chat_template` does, token for token, and mark
which tokens are the assistant's (the tokens a supervised fine-tune learns).

Rendering is Jinja2 in a sandbox with transformers' settings (trim_blocks, lstrip_blocks, loopcontrols,
`raise_exception`, a non-escaping `tojson`) and variables (bos/eos/unk/pad token strings, `add_generation_prompt`).
Token ids are the tokenizer's encoding of the whole rendered text without added special tokens, as
`apply_chat_template(tokenize=True)` does.

The assistant's tokens: where the template marks them with `{% generation %}...{% endgeneration %}`, the tokens
overlapping those character spans (transformers' `return_assistant_tokens_mask`). Otherwise incrementally, as TRL
does for templates without the markers: assistant message i spans from the end of the rendering of messages[:i]
with the generation prompt to the end of the rendering of messages[:i+1]; every such prefix must be a prefix of
the whole rendering, or the template is refused.

SentencePiece tokenizers (gentool's own) have no template: they get DEFAULT_TEMPLATE, Zephyr-style role headers
`<|system|>`, `<|user|>`, `<|assistant|>` on their own line, each message closed by the EOS token, the whole chat
opened by BOS. Their text is encoded in segments cut at the BOS/EOS strings (which become the special ids) and at
the assistant spans.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from gentool.errors import GentoolError, UsageProblem

ROLES = ("system", "user", "assistant")

DEFAULT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{{ '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")

_tracking: ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = ContextVar("generation_spans", default=None)
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _jinja():
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise UsageProblem("chat templates need jinja2", hint="pip install 'gentool[hf]'") from None
    return jinja2, ImmutableSandboxedEnvironment


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    jinja2, Sandbox = _jinja()

    class GenerationTracker(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`: records the character span its body renders to."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_span"), [], [], body).set_lineno(lineno)

        def _span(self, caller) -> str:
            rv = caller()
            if (tracking := _tracking.get()) is not None:
                blocks, spans = tracking
                start = len("".join(blocks))
                spans.append((start, start + len(rv)))
            return rv

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTracker, jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateError as e:
        raise GentoolError(f"the chat template does not compile: {e}", hint="fix the template's Jinja syntax") \
            from None


@contextmanager
def _tracked(blocks: list[str], spans: list[tuple[int, int]]):
    token = _tracking.set((blocks, spans))
    try:
        yield
    finally:
        _tracking.reset(token)


def render_with_spans(template: str, messages: list[dict[str, Any]], **variables: Any
                      ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of its `{% generation %}` blocks."""
    jinja2, _ = _jinja()
    compiled = _compile(template)
    blocks: list[str] = []
    spans: list[tuple[int, int]] = []
    try:
        with _tracked(blocks, spans):
            for block in compiled.generate(messages=messages, **variables):
                blocks.append(block)
    except jinja2.exceptions.TemplateError as e:
        raise GentoolError(f"chat template failed: {e}", hint="check the messages' roles and order") from None
    except (TypeError, KeyError, AttributeError, ValueError) as e:
        raise GentoolError(f"chat template failed ({type(e).__name__}: {e})",
                           hint="check that every message has a role and a string content") from None
    return "".join(blocks), spans


def render_chat_template(template: str, messages: list[dict[str, Any]], **variables: Any) -> str:
    """The conversation as text, as `apply_chat_template(tokenize=False)` renders it."""
    return render_with_spans(template, messages, **variables)[0]


def template_hash(template: str) -> str:
    return "sha256:" + hashlib.sha256(template.encode()).hexdigest()


def known_roles(template: str) -> set[str]:
    """system, user and assistant, plus any other role the template names in quotes (tool, ipython, ...)."""
    named = set(re.findall(r"""role['"]?\]?\s*(?:==|!=)\s*['"]([A-Za-z_][\w-]*)['"]""", template))
    return set(ROLES) | named


@dataclass
class ChatTemplate:
    """A tokenizer's template and the variables it renders with."""

    template: str
    variables: dict[str, str]
    tok: Any

    @classmethod
    def of(cls, tok: Any, template: str | None = None) -> ChatTemplate:
        own = getattr(tok, "chat_template", None)
        hf = hasattr(tok, "config")
        variables = {}
        for name in ("bos", "eos", "unk", "pad"):
            text = None
            if hf:
                value = tok.config.get(f"{name}_token")
                text = value.get("content") if isinstance(value, dict) else value
            elif getattr(tok, f"{name}_id", None) is not None:
                text = tok.sp.id_to_piece(getattr(tok, f"{name}_id"))
            if text is not None:
                variables[f"{name}_token"] = text
        variables.setdefault("bos_token", "")
        variables.setdefault("eos_token", "")
        return cls(template or own or DEFAULT_TEMPLATE, variables, tok)

    @property
    def hash(self) -> str:
        return template_hash(self.template)

    @property
    def marked(self) -> bool:
        return bool(_GENERATION.search(self.template))

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = False) -> str:
        return render_with_spans(self.template, messages, add_generation_prompt=add_generation_prompt,
                                 **self.variables)[0]

    def assistant_spans(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = False
                        ) -> tuple[str, list[tuple[int, int]]]:
        text, spans = render_with_spans(self.template, messages, add_generation_prompt=add_generation_prompt,
                                        **self.variables)
        if self.marked:
            return text, spans
        spans = []
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            start = self.render(messages[:i], add_generation_prompt=True) if i else ""
            upto = self.render(messages[:i + 1])
            if not (upto.startswith(start) and text.startswith(upto)):
                raise GentoolError("the chat template does not render conversations incrementally, so the "
                                   "assistant's tokens cannot be found",
                                   hint="add {% generation %} markers around the assistant's content, or use "
                                        "--train-on all")
            spans.append((len(start), len(upto)))
        return text, spans

    def encode(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = False
               ) -> tuple[list[int], list[bool]]:
        """Token ids (as apply_chat_template(tokenize=True)) and which of them are the assistant's."""
        text, spans = self.assistant_spans(messages, add_generation_prompt=add_generation_prompt)
        return self.encode_text(text, spans)

    def encode_text(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
        if hasattr(self.tok, "_tok"):  # tokenizer.json: one encoding of the whole text, spans through offsets
            enc = self.tok._tok.encode(text, add_special_tokens=False)
            return list(enc.ids), overlap_mask(enc.offsets, spans)
        ids: list[int] = []
        mask: list[bool] = []
        for piece, inside in self._segments(text, spans):
            special = {self.variables.get("bos_token"): self.tok.bos_id, self.variables.get("eos_token"):
                       self.tok.eos_id}
            new = [special[piece]] if piece in special and piece else self.tok.encode(piece)
            ids += new
            mask += [inside] * len(new)
        return ids, mask

    def _segments(self, text: str, spans: list[tuple[int, int]]):
        """Pieces of text cut at span edges and at the BOS/EOS strings, each with whether it is in a span."""
        cuts = sorted({0, len(text), *(c for s in spans for c in s)})
        specials = [s for s in (self.variables.get("bos_token"), self.variables.get("eos_token")) if s]
        pattern = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
        for a, b in zip(cuts, cuts[1:]):
            inside = any(s <= a and b <= e for s, e in spans)
            for piece in (pattern.split(text[a:b]) if pattern else [text[a:b]]):
                if piece:
                    yield piece, inside


def overlap_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Tokens overlapping any span (transformers' rule for the assistant mask); spans and offsets in order."""
    mask = [False] * len(offsets)
    k = 0
    for i, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > spans[k][0]:
            mask[i] = True
    return mask


def check_messages(messages: Any, template: str, *, need_assistant: bool = True, where: str = "") -> None:
    """A list of {role, content} dicts whose roles the template knows, with an assistant turn if training needs
    one. Raises a one-line UsageProblem naming `where` (e.g. 'line 3')."""
    at = f" ({where})" if where else ""
    if not isinstance(messages, list) or not messages:
        raise UsageProblem(f"a chat must be a non-empty list of messages{at}", hint='e.g. [{"role": "user", '
                           '"content": "..."}, {"role": "assistant", "content": "..."}]')
    roles = known_roles(template)
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UsageProblem(f"a message is not a {{role, content}} object with string values{at}",
                               hint='write messages as {"role": "user", "content": "..."}')
        if m["role"] not in roles:
            raise UsageProblem(f"the chat template does not know the role {m['role']!r}{at}",
                               hint="use one of " + ", ".join(sorted(roles)))
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise UsageProblem(f"a chat has no assistant turn, so nothing would be trained on{at}",
                           hint="give every chat at least one assistant message, or use --train-on all")
