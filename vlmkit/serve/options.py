"""OpenAI's per-request decoding options on the server's path: logprobs, presence and frequency
penalties, ``logit_bias``, ``response_format`` (JSON, JSON Schema), tool calls, and vLLM's
``structured_outputs`` (JSON, regular expression, choice, grammar) and ``stop_token_ids``.

``chat_options`` checks a request's options against the model (a bad value is a 400 naming its field)
and compiles its grammar once, computing its first token mask in the request's thread (``checked_start``);
the decoders then add the options' processors to the request's logits pipeline (``generation.logits``, the
pipeline ``generate`` runs), and this module turns the sampled
tokens back into OpenAI's ``logprobs`` entries and ``tool_calls``.

Which scores the logprobs are: the log-softmax of the model's scores after the logits processors
(repetition penalty, ``logit_bias``, presence and frequency penalties, the grammar's mask) and before
the sampling warpers (temperature, top-k, top-p), so a token's logprob does not change with the
temperature, as OpenAI's do not. A token the grammar forbids has logprob -inf, sent as -9999.0.

Tool calls: these models were not trained to call tools, so ``tool_choice`` "required" or a named
function constrains the answer to JSON (as vLLM does for such models): a named function's answer is its
``parameters``; "required" answers ``{"name": ..., "arguments": {...}}`` for one of the tools. "auto" and
"none" answer in text."""

import json
from dataclasses import dataclass

from ..errors import InputError
from ..generation.grammar import GrammarTokenizer, grammar_tokenizer
from ..generation.grammar import GrammarConstraint, check_refs_end, json_constraint
from ..generation.logits import AllowedTokens, LogitBias, NoBadWords, OpenAIPenalties
from ..generation.schema_refs import rebase_refs
from .responses import new_id

NOT_ALLOWED_LOGPROB = -9999.0  # OpenAI's stand-in for -inf in JSON


@dataclass
class ChatOptions:
    """A chat request's OpenAI decoding options, checked and ready for the decoders."""

    logit_bias: dict[int, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    top_logprobs: int | None = None  # None: no logprobs; 0: the sampled token's only
    constraint: tuple[str, str] | None = None  # (kind, source) of the grammar the answer follows, if any
    tool_names: tuple[str, ...] = ()  # the functions a forced tool call may name
    named_tool: str | None = None  # tool_choice named this function: the answer is its arguments
    tokens: GrammarTokenizer | None = None  # the model's vocabulary for llguidance (grammars, token bytes)
    start: object = None  # the grammar's matcher at the answer's start, its first mask already computed
    grammar_field: str = ""  # the request field the grammar comes from (response_format or tools)
    stop_token_ids: frozenset[int] = frozenset()  # vLLM's: drawing one ends the choice (it stays in the answer)
    allowed_token_ids: list[int] | None = None  # vLLM's: only these may be drawn
    bad_words_ids: list[list[int]] | None = None  # vLLM's bad_words, as token ids (with and without a space)

    @property
    def tool_call(self) -> bool:
        return bool(self.tool_names)

    @property
    def constrained(self) -> bool:
        return self.constraint is not None

    def processors(self, prompt_length: int) -> list:
        """The options' processors, added after the checkpoint's in the request's logits pipeline."""
        processors = []
        if self.allowed_token_ids:
            processors.append(AllowedTokens(self.allowed_token_ids))
        if self.bad_words_ids:
            processors.append(NoBadWords(self.bad_words_ids))
        if self.logit_bias:
            processors.append(LogitBias(self.logit_bias))
        if self.presence_penalty or self.frequency_penalty:
            processors.append(OpenAIPenalties(self.presence_penalty, self.frequency_penalty, prompt_length))
        return processors

    def grammar(self, rows: int, prompt_length: int) -> GrammarConstraint | None:
        """One matcher per choice, copied from the one checked with the request (so the worker thread never
        waits on the grammar cache's lock, which a request thread holds while it compiles a grammar)."""
        if not self.constrained:
            return None
        start = self.start if self.start is not None else self.tokens.matcher(*self.constraint)
        return GrammarConstraint([start.deep_copy() for _ in range(rows)], prompt_length,
                                 self.tokens.vocab_size, self.grammar_field)


def chat_options(request, engine) -> ChatOptions:
    """The request's options checked against ``engine``'s model; raises ``InputError`` naming the field."""
    backend = engine.tokenizer.backend
    vocab_size = backend.get_vocab_size(with_added_tokens=True)
    options = ChatOptions(presence_penalty=request.presence_penalty or 0.0,
                          frequency_penalty=request.frequency_penalty or 0.0)
    if request.logit_bias:
        bias = {int(key): float(value) for key, value in request.logit_bias.items()}
        _check_token_ids("logit_bias", bias, vocab_size)
        options.logit_bias = bias
    if request.stop_token_ids:
        _check_token_ids("stop_token_ids", request.stop_token_ids, vocab_size)
        options.stop_token_ids = frozenset(request.stop_token_ids)
    if request.allowed_token_ids:
        _check_token_ids("allowed_token_ids", request.allowed_token_ids, vocab_size)
        options.allowed_token_ids = list(request.allowed_token_ids)
    if request.bad_words:
        options.bad_words_ids = bad_words_ids(engine.tokenizer, request.bad_words)
    if request.logprobs:
        options.top_logprobs = request.top_logprobs or 0
    forced = request.forced_tools
    format_ = request.response_format
    structured = request.structured
    if forced:
        options.tool_names = tuple(tool.function.name for tool in forced)
        for tool in forced:  # each on its own, so the message names the function and its own refs
            try:
                check_refs_end(tool.function.parameters)
            except InputError as err:
                raise InputError(f"tools: function {tool.function.name!r}: {err}") from None
        if isinstance(request.tool_choice, str):  # "required": which tool, and its arguments
            schema = _required_call_schema(forced)
        else:
            options.named_tool, schema = forced[0].function.name, forced[0].function.parameters
        options.constraint, where = json_constraint(schema), "tools"
    elif format_ is not None and format_.type != "text":
        schema = format_.json_schema.schema_ if format_.type == "json_schema" else None
        options.constraint, where = json_constraint(schema), "response_format"
    elif structured is not None:
        options.constraint, where = structured.constraint, "structured_outputs"
    if options.constrained or options.top_logprobs is not None:
        eos = tuple(engine.model.generation_config.eos_token_ids)
        options.tokens = grammar_tokenizer(backend, vocab_size, eos)
    if options.constrained:
        options.grammar_field = where
        try:
            options.start = checked_start(options.tokens, options.constraint)
        except InputError as err:
            raise InputError(f"{where}: {err}") from None
    return options


def checked_start(tokens: GrammarTokenizer, constraint: tuple[str, str]):
    """A matcher for ``constraint`` at the answer's start, its first token mask computed here, in the
    request's thread. llguidance builds its lexer lazily: a grammar too complex for it fails only when a
    mask is computed, after seconds of work that on the scheduler's worker would stall every running
    request. The lexer states are shared by every matcher copied from the same compiled grammar, so the
    worker's copies find them built. A first mask that spends the lexer's whole budget still comes back,
    but leaves the shared lexer failed, which the next copy's first mask shows at once: hence two."""
    for _ in range(2):
        matcher = tokens.matcher(*constraint)
        matcher.compute_bitmask()  # the same mask GrammarConstraint fills (into a bytes object here)
        if matcher.is_error():
            raise InputError(_start_error(matcher.get_error()))
    return matcher


def _start_error(detail: str) -> str:
    """What a grammar that cannot give its first token mask is told: the engine's reason (its first line;
    the rest is the parser's state) and what to change."""
    reason = detail.strip().splitlines()[0] if detail.strip() else "no reason given"
    if "too many" in reason.lower() or "toocomplex" in reason.replace(" ", "").lower():
        return f"the constraint is too complex for the grammar engine to follow ({reason}); simplify it " \
               f"(fewer nested, optional or repeated parts) and try again"
    return f"the grammar engine cannot start an answer under the constraint ({reason}); check the constraint " \
           f"and try again"


def bad_words_ids(tokenizer, words: list[str]) -> list[list[int]]:
    """vLLM's ``bad_words`` as token-id sequences: each word as it starts a text and after a space, so it is
    banned at the start of the answer and inside it."""
    sequences = []
    for word in words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if ids and ids not in sequences:
                sequences.append(ids)
    return sequences


def _check_token_ids(field: str, ids, vocab_size: int) -> None:
    outside = [t for t in ids if t >= vocab_size]
    if outside:
        raise InputError(f"{field}: token ids {outside[:5]} are outside the model's vocabulary of "
                         f"{vocab_size} tokens (ids 0 to {vocab_size - 1})")


def _required_call_schema(tools) -> dict:
    """``{"name": ..., "arguments": {...}}`` for any one of ``tools``. Each tool's parameters move to
    ``$defs/tool_<i>`` of the root with their local refs rebased there, so "#/$defs/P" (as pydantic
    writes nested models) or "#" still mean that tool's own schema, and two tools' $defs never collide."""
    defs, calls = {}, []
    for i, tool in enumerate(tools):
        key = f"tool_{i}"
        defs[key] = rebase_refs(tool.function.parameters, f"/$defs/{key}")
        calls.append({"type": "object", "properties": {"name": {"const": tool.function.name},
                                                       "arguments": {"$ref": f"#/$defs/{key}"}},
                      "required": ["name", "arguments"], "additionalProperties": False})
    return {"$defs": defs, "anyOf": calls}


def tool_calls(options: ChatOptions, text: str) -> list[dict] | None:
    """The answer of a forced tool call as OpenAI's ``tool_calls`` (None: the answer is not a whole call,
    e.g. cut off by max_tokens)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python's JSON reader goes
        return None
    if options.named_tool is not None:
        name, arguments = options.named_tool, value
    elif isinstance(value, dict) and value.get("name") in options.tool_names and "arguments" in value:
        name, arguments = value["name"], value["arguments"]
    else:
        return None
    try:
        arguments = json.dumps(arguments, ensure_ascii=False)
    except RecursionError:  # read, but too deep to write back: the answer's text as it is
        return None
    return [{"id": new_id("call"), "type": "function", "function": {"name": name, "arguments": arguments}}]


def tool_call_text(calls) -> str:
    """An assistant's tool calls (``schemas.ToolCall``) as the text a forced call is decoded from, one per line:
    what tool_choice "required" writes, compact as the grammar writes JSON, with "arguments" before "name"
    (``json_constraint`` sorts the schema's keys, and the grammar follows that order). A chat template that
    renders no tool_calls shows this, so the model sees what it said."""
    def text(call) -> str:
        try:
            return json.dumps({"arguments": call.arguments, "name": call.function.name}, ensure_ascii=False,
                              separators=(",", ":"))
        except RecursionError:  # read, but too deep to write back: the arguments' text as it came
            return json.dumps({"arguments": call.function.arguments, "name": call.function.name},
                              ensure_ascii=False, separators=(",", ":"))

    return "\n".join(map(text, calls))


def logprob_entries(tokens: GrammarTokenizer, token_ids, chosen, top_values, top_ids) -> list[dict]:
    """OpenAI's ``logprobs.content`` entries for one row's sampled token(s): the token, its logprob, its
    UTF-8 bytes and the ``top_logprobs`` best alternatives."""
    def entry(token_id: int, logprob: float) -> dict:
        data = tokens.token_bytes(token_id)
        logprob = logprob if logprob > NOT_ALLOWED_LOGPROB else NOT_ALLOWED_LOGPROB
        return {"token": data.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(data)}

    entries = []
    for token_id, logprob, values, ids in zip(token_ids, chosen, top_values, top_ids):
        item = entry(token_id, logprob)
        item["top_logprobs"] = [entry(i, v) for i, v in zip(ids, values)]
        entries.append(item)
    return entries
