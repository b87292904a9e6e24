"""OpenAI's decoding options through the openai client against a running ``vlmkit serve``: JSON and
JSON Schema answers (the grammar makes every answer parse, greedy or sampled, trained or random
weights), forced tool calls, logprobs (the log-softmax of a direct forward pass), presence/frequency
penalties and logit_bias as OpenAI defines them, clear 400s for bad values, /metrics, and the batch path."""

import json
from typing import Literal

import openai
import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field
from prometheus_client.parser import text_string_to_metric_families

from serve_support import engine_for, serve, user
from vlmkit.builtin import builtin_model_path
from vlmkit.generation.grammar import grammar_tokenizer
from vlmkit.generation.logits import LogitBias, OpenAIPenalties
from vlmkit.serve.config import ServeConfig
from vlmkit.serve.requests import RequestHandler
from vlmkit.serve.scheduler import Scheduler


class Pet(BaseModel):
    """Bounded fields, so that even random weights finish the object within max_tokens."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)
    name: str = Field(max_length=6)
    indoor: bool


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
ASK = user({"type": "text", "text": "Describe a pet of yours as JSON"})


@pytest.fixture(scope="module")
def builtin():
    with serve(builtin_model_path()) as server:
        yield server


@pytest.fixture(scope="module")
def random_janus(janus_dir):
    with serve(janus_dir) as server:
        yield server


def _model(server) -> str:
    return server.config.model_name


@pytest.mark.parametrize("which", ["builtin", "random_janus"])
def test_json_schema_answers_always_parse_and_validate_greedy_and_sampled(which, request):
    server = request.getfixturevalue(which)
    client = server.openai()
    for options in ({"temperature": 0}, {"temperature": 1, "seed": 1, "n": 3}, {"temperature": 1, "seed": 2}):
        done = client.chat.completions.parse(model=_model(server), messages=ASK, max_tokens=64,
                                             response_format=Pet, **options)
        for choice in done.choices:
            assert choice.finish_reason == "stop"
            assert isinstance(choice.message.parsed, Pet)  # parse validated it against the model
    if which == "builtin":  # any object: unbounded, so only a trained model is sure to close it in time
        plain = client.chat.completions.create(model=_model(server), messages=ASK, max_tokens=64, temperature=1,
                                               seed=3, response_format={"type": "json_object"})
        answer = plain.choices[0].message.content
        assert plain.choices[0].finish_reason == "stop" and isinstance(json.loads(answer), dict)


def test_a_constrained_request_shares_steps_with_free_ones(builtin):
    from concurrent.futures import ThreadPoolExecutor

    client = builtin.openai()
    before = builtin.stats()["batched_steps"]

    def ask(constrained: bool):
        if constrained:
            return client.chat.completions.parse(model=_model(builtin), messages=ASK, max_tokens=48, temperature=1,
                                                 seed=5, response_format=Pet).choices[0].message.parsed
        return client.chat.completions.create(model=_model(builtin), messages=ASK, max_tokens=48, temperature=1,
                                              seed=5, extra_body={"ignore_eos": True}).choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(ask, [True, False, True, False]))
    assert isinstance(results[0], Pet) and isinstance(results[2], Pet) and results[1] == results[3]
    assert builtin.stats()["batched_steps"] > before


def test_forced_tool_calls_parse_and_match_the_function_schema_plain_and_streamed(builtin):
    client = builtin.openai()
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in (named, "required"):
        done = client.chat.completions.create(model=_model(builtin), messages=ASK, max_tokens=64, temperature=1,
                                              seed=4, tools=[WEATHER, TIME], tool_choice=choice)
        answer = done.choices[0]
        assert answer.finish_reason == "tool_calls" and answer.message.content is None
        call = answer.message.tool_calls[0]
        arguments = json.loads(call.function.arguments)
        if call.function.name == "get_weather":
            assert arguments["city"] in ("Paris", "Oslo") and 1 <= arguments["days"] <= 7
        else:
            assert choice == "required" and arguments["zone"] in ("UTC", "CET")
    chunks = list(client.chat.completions.create(model=_model(builtin), messages=ASK, max_tokens=64, stream=True,
                                                 tools=[WEATHER], tool_choice=named))
    calls = [call for chunk in chunks for call in chunk.choices[0].delta.tool_calls or ()]
    assert [call.function.name for call in calls] == ["get_weather"]
    assert set(json.loads(calls[0].function.arguments)) == {"city", "days"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    auto = client.chat.completions.create(model=_model(builtin), messages=ASK, max_tokens=6, tools=[WEATHER],
                                          tool_choice="auto")
    assert auto.choices[0].message.content  # "auto": these models answer in text


def _vocab_bytes(engine) -> dict[bytes, int]:
    backend = engine.tokenizer.backend
    tokens = grammar_tokenizer(backend, backend.get_vocab_size(with_added_tokens=True),
                               tuple(engine.model.generation_config.eos_token_ids))
    return {tokens.token_bytes(i): i for i in reversed(range(tokens.vocab_size))}


def _answer_and_its_logits(engine, entries) -> tuple[list[int], torch.Tensor]:
    """The answer's token ids (from the logprob entries' bytes) and, from one direct forward pass over the
    prompt and the answer, the fp32 logits [answer length, vocab] that chose each of them."""
    ids_of = _vocab_bytes(engine)
    answer = [ids_of[bytes(entry.bytes)] for entry in entries]
    inputs = dict(RequestHandler(engine, ServeConfig(model="m")).prepare_chat({"messages": ASK})[1].inputs)
    prompt = inputs.pop("input_ids")
    sequence = torch.cat([prompt, torch.tensor([answer])], dim=1)
    inputs["attention_mask"] = torch.ones_like(sequence)
    with torch.no_grad():
        logits = engine.model(input_ids=sequence, **inputs).logits[0, prompt.shape[1] - 1:-1].float()
    return answer, logits


def test_logprobs_are_the_log_softmax_of_a_direct_forward_pass(builtin):
    engine = engine_for(builtin_model_path())
    client = builtin.openai()
    done = client.chat.completions.create(model=_model(builtin), messages=ASK, max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=4, extra_body={"ignore_eos": True})
    entries = done.choices[0].logprobs.content
    answer, logits = _answer_and_its_logits(engine, entries)
    expected = logits.log_softmax(dim=-1)
    for step, entry in enumerate(entries):
        assert entry.logprob == pytest.approx(expected[step, answer[step]].item(), abs=1e-3)
        best = expected[step].topk(4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-3)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the sampled token is the best one
    streamed = client.chat.completions.create(model=_model(builtin), messages=ASK, max_tokens=6, temperature=0,
                                              logprobs=True, top_logprobs=4, extra_body={"ignore_eos": True}, stream=True)
    pieces = [e for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
              for e in chunk.choices[0].logprobs.content]
    # the same answer; its logprobs up to the rounding of a differently shaped prefill (the second request
    # reuses the first one's prompt keys/values from the prompt cache)
    assert [e.token for e in pieces] == [e.token for e in entries]
    assert [e.logprob for e in pieces] == pytest.approx([e.logprob for e in entries], abs=1e-5)


def test_penalised_logprobs_are_the_forward_pass_scores_less_openais_penalties(builtin):
    engine = engine_for(builtin_model_path())
    done = builtin.openai().chat.completions.create(
        model=_model(builtin), messages=ASK, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2,
        presence_penalty=0.5, frequency_penalty=1.5, logit_bias={"65": 3}, extra_body={"ignore_eos": True})
    entries = done.choices[0].logprobs.content
    answer, logits = _answer_and_its_logits(engine, entries)
    for step, entry in enumerate(entries):
        scores = logits[step].clone()
        scores[65] += 3
        for token in set(answer[:step]):
            scores[token] -= 0.5 + 1.5 * answer[:step].count(token)
        expected = scores.log_softmax(dim=-1)
        assert answer[step] == int(expected.argmax())  # greedy on the processed scores
        assert entry.logprob == pytest.approx(expected[answer[step]].item(), abs=1e-3)


def test_a_huge_logit_bias_forces_a_token_and_minus_100_bans_it(builtin):
    engine = engine_for(builtin_model_path())
    client = builtin.openai()
    forced_id = 65
    forced = client.chat.completions.create(model=_model(builtin), messages=ASK, max_tokens=5, temperature=1,
                                            seed=0, logit_bias={str(forced_id): 100}, logprobs=True)
    ids_of = _vocab_bytes(engine)
    assert [ids_of[bytes(e.bytes)] for e in forced.choices[0].logprobs.content] == [forced_id] * 5
    plain = client.chat.completions.create(model=_model(builtin), messages=ASK, max_tokens=1, temperature=0,
                                           logprobs=True)
    first = ids_of[bytes(plain.choices[0].logprobs.content[0].bytes)]
    banned = client.chat.completions.create(model=_model(builtin), messages=ASK, max_tokens=1, temperature=0,
                                            logprobs=True, logit_bias={str(first): -100})
    assert ids_of[bytes(banned.choices[0].logprobs.content[0].bytes)] != first


def test_penalties_and_logit_bias_follow_openais_definitions_on_scores():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 11, generator=generator)
    input_ids = torch.tensor([[7, 7, 3, 3, 3, 5], [1, 2, 9, 9, 10, 0]])  # the first 2 are the prompt
    penalised = OpenAIPenalties(presence=0.5, frequency=0.25, prompt_length=2)(input_ids, scores)
    expected = scores.clone()
    for row in range(2):
        generated = input_ids[row, 2:].tolist()
        for token in set(generated):
            expected[row, token] -= 0.5 + 0.25 * generated.count(token)
    torch.testing.assert_close(penalised, expected)
    assert penalised[0, 7] == scores[0, 7]  # prompt tokens are not penalised
    biased = LogitBias({3: 2.5, 10: -100.0})(input_ids, scores)
    assert torch.equal(biased[:, 3], scores[:, 3] + 2.5) and torch.equal(biased[:, 10], scores[:, 10] - 100)


def test_a_frequency_penalty_lowers_repeats(builtin):
    client = builtin.openai()
    answers = {}
    for penalty in (0.0, 2.0):
        done = client.chat.completions.create(model=_model(builtin), messages=ASK, max_tokens=24, temperature=0,
                                              frequency_penalty=penalty, presence_penalty=penalty / 2,
                                              logprobs=True, extra_body={"ignore_eos": True})
        tokens = [e.token for e in done.choices[0].logprobs.content]
        answers[penalty] = len(tokens) - len(set(tokens))
    assert answers[2.0] < answers[0.0]


@pytest.mark.parametrize("options, field", [
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logit_bias": {"99999": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 100.5}}, "logit_bias"),
    ({"logit_bias": {"five": 1}}, "logit_bias"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "banana"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": 0.0}}]}, "tools"),  # not a schema
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 1}}}, "response_format"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
])
def test_bad_option_values_are_a_400_naming_the_field(builtin, options, field):
    with pytest.raises(openai.BadRequestError) as caught:
        builtin.openai().chat.completions.create(model=_model(builtin), messages=ASK, max_tokens=2, **options)
    assert field in caught.value.message


def _counters(server) -> dict:
    import httpx

    text = httpx.get(server.url + "/metrics", headers=server.headers).text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_metrics_count_what_was_served(builtin):
    before = _counters(builtin)
    client = builtin.openai()
    done = [client.chat.completions.create(model=_model(builtin), messages=ASK, max_tokens=5, temperature=0,
                                           extra_body={"ignore_eos": True}) for _ in range(2)]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=_model(builtin), messages=ASK, presence_penalty=9)
    client.images.generate(model=_model(builtin), prompt="a red square", n=1)
    after = _counters(builtin)

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert grew("vlmkit_requests_total", endpoint="/v1/chat/completions", status="200") == 2
    assert grew("vlmkit_requests_total", endpoint="/v1/chat/completions", status="400") == 1
    assert grew("vlmkit_generation_tokens_total") == sum(d.usage.completion_tokens for d in done) == 10
    assert grew("vlmkit_prompt_tokens_total") >= sum(d.usage.prompt_tokens for d in done)
    assert grew("vlmkit_images_generated_total") == 1
    assert grew("vlmkit_time_to_first_token_seconds_count") == 2
    assert grew("vlmkit_time_per_output_token_seconds_count") == 2
    assert after[("vlmkit_queue_depth", ())] == 0 and ("vlmkit_running_rows", ()) in after
    import httpx
    assert "/metrics" not in httpx.get(builtin.url + "/openapi.json").json()["paths"]


def test_batch_rows_take_the_same_options():
    engine = engine_for(builtin_model_path())
    handler = RequestHandler(engine, ServeConfig(model="m"))
    scheduler = Scheduler(engine).start()
    try:
        body = {"messages": ASK, "max_tokens": 64, "temperature": 1, "seed": 9, "logprobs": True,
                "response_format": {"type": "json_schema",
                                    "json_schema": {"name": "Pet", "schema": Pet.model_json_schema()}}}
        (status, answer), (bad, error) = handler.run_many(
            scheduler, [("/v1/chat/completions", body), ("/v1/chat/completions", {"messages": ASK, "logit_bias": {"1": 500}})])
    finally:
        scheduler.stop()
    assert status == 200 and bad == 400 and "logit_bias" in error["error"]["message"]
    Pet.model_validate_json(answer["choices"][0]["message"]["content"])
    assert answer["choices"][0]["logprobs"]["content"]


def test_the_grammar_constraint_is_a_logits_processor_generate_takes_too():
    from vlmkit.generation.grammar import GrammarConstraint

    engine = engine_for(builtin_model_path())
    backend = engine.tokenizer.backend
    tokens = grammar_tokenizer(backend, backend.get_vocab_size(with_added_tokens=True),
                               tuple(engine.model.generation_config.eos_token_ids))
    inputs = engine.prepare_chat(engine_messages_of(ASK))
    prompt_length = inputs["input_ids"].shape[1]
    schema = Pet.model_json_schema()
    constraint = GrammarConstraint([tokens.json_matcher(schema) for _ in range(2)], prompt_length, tokens.vocab_size)
    output = engine.model.generate(**inputs, max_new_tokens=64, do_sample=True, seed=0, num_return_sequences=2,
                                   logits_processor=[constraint])
    for row in output[:, prompt_length:].tolist():
        Pet.model_validate_json(engine.tokenizer.decode(row, skip_special_tokens=True))


def engine_messages_of(messages):
    return [{"role": m["role"], "content": [{"type": "text", "text": part["text"]} for part in m["content"]]}
            for m in messages]


class Point(BaseModel):
    model_config = ConfigDict(extra="forbid")  # bounded, so that the answer ends within max_tokens

    x: int = Field(ge=0, le=9)
    y: int = Field(ge=0, le=9)


class Segment(BaseModel):
    """A nested model: pydantic writes Point into $defs and refers to it as "#/$defs/Point"."""

    model_config = ConfigDict(extra="forbid")
    start: Point
    end: Point


class Circle(BaseModel):
    model_config = ConfigDict(extra="forbid")
    center: Point  # the same $defs name as Segment's: the tools' $defs must not collide
    radius: int = Field(ge=1, le=9)


def _tool(name: str, model) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": model.model_json_schema()}}


def test_required_tool_calls_take_parameters_with_defs_and_refs(builtin):
    assert "$defs" in Segment.model_json_schema()
    client = builtin.openai()
    names = set()
    for seed in range(3):
        done = client.chat.completions.create(model=_model(builtin), messages=ASK, max_tokens=80, temperature=1,
                                              seed=seed, tools=[_tool("segment", Segment), _tool("circle", Circle)],
                                              tool_choice="required")
        call = done.choices[0].message.tool_calls[0]
        model = {"segment": Segment, "circle": Circle}[call.function.name]
        model.model_validate_json(call.function.arguments)
        names.add(call.function.name)
    assert names  # every answer was a whole, valid call


RECURSIVE_SCHEMAS = {
    "itself": {"$ref": "#"},
    "a $defs cycle": {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    "a property holding itself": {"properties": {"a": {"$ref": "#/properties/a"}}},
    "a required child": {"type": "object", "properties": {"child": {"$ref": "#"}}, "required": ["child"]},
}


@pytest.mark.parametrize("schema", RECURSIVE_SCHEMAS.values(), ids=RECURSIVE_SCHEMAS.keys())
def test_a_recursive_schema_with_no_way_out_is_a_400_before_decoding(builtin, schema):
    client = builtin.openai()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=_model(builtin), messages=ASK, max_tokens=8, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert caught.value.message.count("response_format: the JSON Schema's $ref") == 1
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=_model(builtin), messages=ASK, max_tokens=8, tool_choice="required",
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": schema}}])
    assert "tools: function 'f': the JSON Schema's $ref" in caught.value.message


def test_a_recursive_schema_with_a_way_out_decodes_to_valid_json(builtin):
    tree = {"type": "object", "properties": {"label": {"enum": ["a", "b"]},
                                             "children": {"type": "array", "items": {"$ref": "#"}, "maxItems": 2}},
            "required": ["label"], "additionalProperties": False}
    done = builtin.openai().chat.completions.create(
        model=_model(builtin), messages=ASK, max_tokens=64, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "tree", "schema": tree}})
    answer = done.choices[0]
    if answer.finish_reason == "stop":
        assert json.loads(answer.message.content)["label"] in ("a", "b")


class _Job:
    generator = None


def _grammar_rows(engine, schema, answers: list[str], field="response_format"):
    """RowSampling for one greedy row per answer so far, each under its own matcher of ``schema``."""
    from vlmkit.generation.config import GenerationConfig
    from vlmkit.generation.grammar import GrammarConstraint
    from vlmkit.serve.batching import RowSampling

    backend = engine.tokenizer.backend
    tokens = grammar_tokenizer(backend, backend.get_vocab_size(with_added_tokens=True),
                               tuple(engine.model.generation_config.eos_token_ids))
    prompt = [1, 2, 3]
    requests, row = {}, 0
    for text in answers:
        seen = torch.tensor([prompt + tokens.tokenizer.tokenize_str(text)])
        constraint = GrammarConstraint([tokens.json_matcher(schema)], len(prompt), tokens.vocab_size, field)
        requests[_Job()] = RowSampling([row], GenerationConfig(), None, seen, [constraint])
        row += 1
    return requests, tokens


def test_a_request_whose_grammar_fails_in_a_batched_step_fails_again_alone_and_alone():
    """The grammar of the first request refuses its answer so far; the batched step raises, and the
    isolation's rerun must fail that request again (its matcher is not taken as finished, which allowed
    only EOS and ended the answer as '{' with finish_reason "stop"), while the other request gets the
    token it gets alone."""
    from vlmkit.serve.isolation import sample_isolated

    engine = engine_for(builtin_model_path())
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    requests, tokens = _grammar_rows(engine, schema, ['{"m', '{"n'])
    logits = torch.randn(2, tokens.vocab_size, generator=torch.Generator().manual_seed(0))
    bad, good = list(requests)
    alone_requests, _ = _grammar_rows(engine, schema, ['{"n'])
    alone, _ = sample_isolated(logits[1:], {_Job(): next(iter(alone_requests.values()))})
    drawn, failed = sample_isolated(logits, requests)
    assert set(failed) == {bad} and drawn[1] == alone[0]
    message = str(failed[bad])
    assert message.startswith("response_format: ") and len(message) < 300 and "<state>" not in message
    with pytest.raises(Exception, match="response_format: "):  # and once more: a failed grammar stays failed
        requests[bad].processors[0](requests[bad].seen_ids, logits[:1])
