"""Chat templates rendered in jinja2's immutable sandbox, the way checkpoints' templates expect
(trim_blocks, lstrip_blocks, loop controls, ``raise_exception``, a non-escaping ``tojson``)."""

import contextvars
import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from ..errors import TemplateError


def _raise_exception(message):
    raise TemplateError(f"the chat template refused the conversation: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


# (output so far, spans) of the render that asked for its generation spans (see render_chat_template)
_GENERATION_SPANS = contextvars.ContextVar("vlmkit_generation_spans", default=None)


def _generation_block_extension():
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationBlock(Extension):
        """``{% generation %}...{% endgeneration %}``: transformers' marker around assistant text. Rendering
        emits the body unchanged and, for a render that asks, notes where it lies in the output (the
        characters of assistant tokens masks), as transformers' AssistantTracker does."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_note_span"), [], [], body).set_lineno(lineno)

        def _note_span(self, caller):
            text = caller()
            tracker = _GENERATION_SPANS.get()
            if tracker is not None:
                output, spans = tracker
                start = sum(len(chunk) for chunk in output)
                spans.append((start, start + len(text)))
            return text

    return GenerationBlock


@lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", _generation_block_extension()])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as err:
        raise TemplateError(f"the chat template does not parse: {err}") from None


def render_chat_template(template: str, messages: list[dict], generation_spans: list | None = None,
                         **variables) -> str:
    """Render one conversation. Sandbox violations, template errors and Python errors raised while rendering
    (a variable of a type the template cannot use: ``{{ x|length }}`` of a number) become ``TemplateError``.
    ``generation_spans`` (a list) receives the (start, end) characters of each ``{% generation %}`` block."""
    import jinja2

    try:
        compiled = _compile(template)
        if generation_spans is None:
            return compiled.render(messages=messages, **variables)
        output: list[str] = []
        tracking = _GENERATION_SPANS.set((output, generation_spans))
        try:
            for chunk in compiled.generate(messages=messages, **variables):  # a block's start: what came before
                output.append(chunk)
        finally:
            _GENERATION_SPANS.reset(tracking)
        return "".join(output)
    except jinja2.exceptions.SecurityError as err:
        raise TemplateError(f"the chat template tried an unsafe operation: {err}") from None
    except jinja2.TemplateError as err:
        raise TemplateError(f"the chat template failed: {err}") from None
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, ZeroDivisionError, OverflowError) as err:
        raise TemplateError(f"the chat template failed on the values it was given: {type(err).__name__}: "
                            f"{err}") from None


@lru_cache(maxsize=16)
def template_variables(template: str) -> frozenset:
    """The variables a template reads (``messages``, ``add_generation_prompt``, ``tools``...): a call's
    keyword arguments among them are the template's, the others the processor's."""
    import jinja2.meta

    return frozenset(jinja2.meta.find_undeclared_variables(_compile(template).environment.parse(template)))


# what marks the end of the final message while the template renders, so the text after it can be cut
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def render_conversation(template: str, messages: list[dict], add_generation_prompt: bool = False,
                        continue_final_message: bool = False, generation_spans: list | None = None,
                        **variables) -> str:
    """Render one conversation; with ``continue_final_message`` the prompt ends inside the last
    message (no end-of-turn after it), so the model continues that text, as in transformers.
    ``generation_spans``: see ``render_chat_template``."""
    if not continue_final_message:
        return render_chat_template(template, messages, generation_spans, add_generation_prompt=add_generation_prompt,
                                    **variables)
    if generation_spans is not None:
        raise TemplateError("continue_final_message and return_assistant_tokens_mask cannot be combined (as in "
                            "transformers): the continued message has no end to mask up to")
    if add_generation_prompt:
        raise TemplateError("continue_final_message and add_generation_prompt cannot both be set: continue the "
                            "final message, or prompt a new assistant turn")
    messages = [dict(m) for m in messages]
    final = messages[-1] if messages else {}
    content = final.get("content")
    if isinstance(content, str):
        final_text, final["content"] = content, content + _CONTINUE_TAG
    else:
        blocks = [dict(b) if isinstance(b, dict) else b for b in content or []]
        texts = [i for i, b in enumerate(blocks) if isinstance(b, dict) and "text" in b]
        if not texts:
            raise TemplateError("continue_final_message is set but the final message has no text to continue")
        if texts[-1] != len(blocks) - 1:
            raise TemplateError("continue_final_message is set but the final message ends with an image or other "
                                "part after its text; the text to continue must come last")
        final_text = blocks[texts[-1]]["text"]
        blocks[texts[-1]]["text"] = final_text + _CONTINUE_TAG
        final["content"] = blocks
    rendered = render_chat_template(template, messages, add_generation_prompt=False, **variables)
    tag = _CONTINUE_TAG.strip()
    if final_text.strip() not in rendered or tag not in rendered:
        raise TemplateError("continue_final_message is set but the chat template does not write the final message "
                            "as given, so it cannot be continued")
    end = rendered.rindex(tag)
    # a template that keeps the message's spacing is cut exactly; one that trimmed it, before the spaces
    return rendered[:end] if rendered[end:end + len(_CONTINUE_TAG)] == _CONTINUE_TAG else rendered[:end].rstrip()


def find_chat_template(folder: Path, *configs: dict) -> str | None:
    """The tokenizer's chat template, found as transformers' tokenizers find it: ``chat_template.jinja``,
    else a ``chat_template`` key in one of the given configs (tokenizer_config.json's; a string, or a list
    of named templates). ``chat_template.json`` is the processor's file (``processor_chat_template``), which
    transformers' tokenizers never read: llava-hf repos keep the processor's multimodal template there and
    the language model's text-only template in tokenizer_config.json, and each object gets its own."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    for config in configs:
        template = _pick(config.get("chat_template"))
        if template:
            return template
    return None


def processor_chat_template(folder: Path, processor_config: dict, tokenizer_config: dict | None = None) -> str | None:
    """The processor's chat template, in transformers' ``ProcessorMixin`` order: a ``chat_template`` key in
    processor_config.json, else the legacy ``chat_template.json``, else ``chat_template.jinja``. Where a
    folder has none of these, the tokenizer's (tokenizer_config.json's key), which transformers' processors
    do not take (their ``apply_chat_template`` then fails for want of a template)."""
    template = _pick(processor_config.get("chat_template"))
    if template:
        return template
    json_file = folder / "chat_template.json"
    if json_file.is_file():
        template = _pick(json.loads(json_file.read_text(encoding="utf-8")).get("chat_template"))
        if template:
            return template
    return find_chat_template(folder, tokenizer_config or {})


def _pick(template):
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template}
        return named.get("default") or next(iter(named.values()), None)
    return template
