"""vLLM's sampling extras on ``vlmkit serve`` (sent as the openai client's ``extra_body``) and on the offline
``SamplingParams``: ``min_tokens`` holds back the end, ``stop_token_ids`` end the answer on a token (kept in
the answer, as vLLM keeps a non-special stop token), ``min_p`` draws as ``generate(min_p=...)`` with the same
seed; ``structured_outputs`` (and the older ``guided_*`` names) hold every answer, greedy or sampled, to a
choice, a regular expression, a JSON Schema or a Lark/GBNF grammar; bad values are 400s naming the field."""

import json

import openai
import pytest
from serve_support import data_uri, engine_for, image_part, serve, served_text, user

from vlmkit.batch.offline import LLM, SamplingParams
from vlmkit.builtin import builtin_model_path

ASK = user("Where is the triangle?")


@pytest.fixture(scope="module")
def server():
    with serve(builtin_model_path()) as running:
        yield running


@pytest.fixture(scope="module")
def engine():
    return engine_for(builtin_model_path())


def _generated(engine, max_new_tokens: int, **options) -> list[int]:
    """The answer's token ids from ``generate`` itself (the parity tests hold it to transformers)."""
    inputs = engine.prepare_chat(ASK)
    output = engine.model.generate(**inputs, max_new_tokens=max_new_tokens, generation_mode="text", **options)
    return output[0, inputs["input_ids"].shape[1]:].tolist()


def _answer(server, **options):
    """The first choice; vLLM's extras go in the body as the openai client sends them (``extra_body``)."""
    extra = {k: options.pop(k) for k in ("min_tokens", "min_p", "stop_token_ids") if k in options}
    return server.chat(ASK, extra_body=extra, **options).choices[0]


def _first_new_token(tokens: list[int]) -> int:
    """The position of a token (past the first two) that the answer has not drawn before."""
    return next(i for i, token in enumerate(tokens) if i >= 2 and token not in tokens[:i])


def _text(engine, tokens: list[int]) -> str:
    return served_text(engine, engine.tokenizer.decode(tokens, skip_special_tokens=True))


def test_min_tokens_holds_back_the_end_as_generate_min_new_tokens(server, engine):
    plain = _generated(engine, 40)
    assert plain[-1] in engine.model.generation_config.eos_token_ids and len(plain) < 30  # ends by itself
    wanted = len(plain) + 6
    expected = _generated(engine, 40, min_new_tokens=wanted)
    assert len(expected) > wanted and not set(expected[:wanted]) & set(engine.model.generation_config.eos_token_ids)
    choice = _answer(server, max_tokens=40, min_tokens=wanted)
    assert choice.message.content == _text(engine, expected)
    assert choice.finish_reason == ("stop" if len(expected) < 40 else "length")


def test_a_stop_token_id_ends_the_answer_and_stays_in_it(server, engine):
    plain = _generated(engine, 40)
    position = _first_new_token(plain)
    choice = _answer(server, max_tokens=40, stop_token_ids=[plain[position], len(engine.tokenizer) - 1])
    assert choice.finish_reason == "stop"
    assert choice.message.content == _text(engine, plain[:position + 1])
    answer = server.chat(ASK, max_tokens=40, extra_body={"stop_token_ids": [plain[position]]})
    assert answer.usage.completion_tokens == position + 1


def test_min_tokens_holds_back_the_stop_token_ids_too(server, engine):
    plain = _generated(engine, 40)
    choice = _answer(server, max_tokens=40, min_tokens=3, stop_token_ids=[plain[0]])
    assert len(engine.tokenizer.encode(choice.message.content, add_special_tokens=False)) >= 3


def test_min_p_draws_as_generate_with_the_same_seed(server, engine):
    answers = []
    for seed in range(4):
        options = dict(do_sample=True, temperature=1.8, top_p=1.0, top_k=0, seed=seed)
        expected = _generated(engine, 12, min_p=0.3, **options)
        choice = _answer(server, max_tokens=12, temperature=1.8, seed=seed, min_p=0.3)
        assert choice.message.content == _text(engine, expected)
        answers.append((choice.message.content, _text(engine, _generated(engine, 12, **options))))
    assert any(with_min_p != without for with_min_p, without in answers)  # min_p changed some draw


@pytest.mark.parametrize("extra, field", [
    ({"min_p": 1.5}, "min_p"), ({"min_p": "0.1"}, "min_p"), ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 9}, "min_tokens"),  # more than max_tokens
    ({"stop_token_ids": [10 ** 9]}, "stop_token_ids"), ({"stop_token_ids": ["5"]}, "stop_token_ids"),
    ({"stop_token_ids": 5}, "stop_token_ids"), ({"stop_token_ids": [0] * 1025}, "stop_token_ids"),
    ({"allowed_token_ids": [10 ** 6]}, "allowed_token_ids"), ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"bad_words": ["  "]}, "bad_words"), ({"bad_words": [5]}, "bad_words"), ({"bad_words": ["x" * 1001]}, "bad_words"),
    ({"include_stop_str_in_output": "yes"}, "include_stop_str_in_output"),
])
def test_bad_extras_are_a_400_naming_the_field(server, extra, field):
    with pytest.raises(openai.BadRequestError) as caught:
        server.chat(ASK, max_tokens=4, extra_body=extra)
    assert field in caught.value.message


def test_a_lone_surrogate_in_chat_template_kwargs_is_a_400(server):
    import httpx

    body = {"messages": ASK, "max_tokens": 2, "chat_template_kwargs": {"hint": ["\ud800"]}}
    response = httpx.post(server.url + "/v1/chat/completions", content=json.dumps(body).encode(),
                          headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 400 and "chat_template_kwargs" in response.json()["error"]["message"]


def test_min_tokens_past_the_context_is_a_400(server, engine):
    with pytest.raises(openai.BadRequestError, match="min_tokens: .* do not fit"):
        server.chat(ASK, extra_body={"min_tokens": engine.model.max_context})


def test_offline_sampling_params_take_the_extras(engine):
    plain = _generated(engine, 40)
    wanted, position = len(plain) + 6, _first_new_token(plain)
    llm = LLM(str(builtin_model_path()))
    outputs = llm.chat([ASK, ASK], [SamplingParams(temperature=0, max_tokens=40, min_tokens=wanted),
                                    SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[plain[position]])],
                       use_tqdm=False)
    assert outputs[0].outputs[0].text == _text(engine, _generated(engine, 40, min_new_tokens=wanted))
    assert outputs[1].outputs[0].text == _text(engine, plain[:position + 1])
    chosen = llm.chat(ASK, SamplingParams(temperature=1.5, seed=2, n=4, structured_outputs={"choice": CHOICES}),
                      use_tqdm=False)
    assert {output.text for output in chosen[0].outputs} <= set(CHOICES)
    full = _text(engine, plain)
    stop = full[2:5]
    kept = llm.chat(ASK, SamplingParams(temperature=0, max_tokens=40, stop=stop, include_stop_str_in_output=True),
                    use_tqdm=False)
    assert kept[0].outputs[0].text == full[:full.find(stop) + len(stop)]


CHOICES = ["left", "right", 'naïve "quoted" \\ one']
GBNF = 'root ::= "yes" | "no" | "maybe " side\nside ::= "left" | "right"'
LARK = 'start: "yes" | "no" | "maybe " SIDE\nSIDE: "left" | "right"'
GRAMMAR_ANSWERS = {"yes", "no", "maybe left", "maybe right"}
PET = {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "age": {"type": "integer", "minimum": 0,
                                                                                  "maximum": 20}},
       "required": ["kind", "age"], "additionalProperties": False}


def _answers(server, extra: dict) -> list[str]:
    """A greedy answer and three sampled ones under ``extra``, each finished by its grammar."""
    choices = server.chat(ASK, max_tokens=40, extra_body=extra).choices
    choices += server.chat(ASK, max_tokens=40, temperature=1.5, seed=3, n=3, extra_body=extra).choices
    assert all(choice.finish_reason == "stop" for choice in choices)
    return [choice.message.content for choice in choices]


@pytest.mark.parametrize("form", ["structured_outputs", "guided"])
def test_structured_outputs_choice_regex_json_and_grammar_hold_every_answer(server, form):
    import re

    def extra(kind, value):
        return {"structured_outputs": {kind: value}} if form == "structured_outputs" else {f"guided_{kind}": value}

    assert set(_answers(server, extra("choice", CHOICES))) <= set(CHOICES)
    assert all(re.fullmatch(r"[0-9]{3}-[a-z]{2}", a) for a in _answers(server, extra("regex", r"[0-9]{3}-[a-z]{2}")))
    for schema in (PET, json.dumps(PET)):  # vLLM takes the schema as an object or as its text
        for answer in _answers(server, extra("json", schema)):
            pet = json.loads(answer)
            assert set(pet) == {"kind", "age"} and pet["kind"] in ("cat", "dog") and 0 <= pet["age"] <= 20
    for grammar in (GBNF, LARK):
        assert set(_answers(server, extra("grammar", grammar))) <= GRAMMAR_ANSWERS
    if form == "structured_outputs":  # any JSON object: what response_format json_object answers
        options = dict(max_tokens=24, temperature=1.2, seed=5)
        answer = server.chat(ASK, extra_body={"structured_outputs": {"json_object": True}}, **options)
        expected = server.chat(ASK, response_format={"type": "json_object"}, **options)
        assert answer.choices[0].message.content == expected.choices[0].message.content
        assert answer.choices[0].message.content.startswith("{")


@pytest.mark.parametrize("extra, phrase", [
    ({"structured_outputs": {"regex": "["}}, "structured_outputs: the regular expression cannot be used"),
    ({"structured_outputs": {"grammar": "start: missing_rule"}}, "structured_outputs: the grammar cannot be used"),
    ({"structured_outputs": {"grammar": "root ::= ("}}, "structured_outputs: not a valid grammar"),
    ({"structured_outputs": {"choice": []}}, "choice"),
    ({"structured_outputs": {"json": "{not json"}}, "JSON text"),
    ({"structured_outputs": {"json": 5}}, "structured_outputs.json"),
    ({"structured_outputs": {}}, "give exactly one of json, json_object, regex, choice and grammar"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "give exactly one of"),
    ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, "whitespace_pattern is not supported"),
    ({"structured_outputs": {"regex": "a"}, "guided_choice": ["a"]}, "give one of structured_outputs, guided_json"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
     "cannot be combined with response_format"),
    ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern is not supported"),
    ({"structured_outputs": {"regex": "(a{1000}){1000}"}}, "structured_outputs: the constraint is too complex"),
    ({"structured_outputs": {"grammar": " \n"}}, "structured_outputs: not a valid grammar: the grammar is empty"),
    ({"guided_grammar": "x ::= "}, "structured_outputs: not a valid grammar"),
    ({"guided_json": False}, "the JSON Schema false allows no value"),
])
def test_bad_structured_outputs_are_a_400_naming_the_problem(server, extra, phrase):
    with pytest.raises(openai.BadRequestError) as caught:
        server.chat(ASK, max_tokens=4, extra_body=extra)
    assert phrase in caught.value.message, caught.value.message


def test_allowed_token_ids_leave_only_those_tokens_as_generate_suppressing_the_rest(server, engine):
    plain = _generated(engine, 40)
    allowed = sorted({*plain[1:3], 7, 11, *engine.model.generation_config.eos_token_ids})
    rest = [t for t in range(engine.model.get_output_embeddings().weight.shape[0]) if t not in allowed]
    expected = _generated(engine, 12, suppress_tokens=rest)
    assert set(expected) <= set(allowed) and expected != plain[:len(expected)]
    choice = server.chat(ASK, max_tokens=12, extra_body={"allowed_token_ids": allowed}).choices[0]
    assert choice.message.content == _text(engine, expected)


def test_bad_words_are_banned_with_and_without_a_leading_space(server, engine):
    from vlmkit.serve.options import bad_words_ids

    word = _text(engine, _generated(engine, 40)).split()[-1]  # a word the plain answer ends with
    banned = bad_words_ids(engine.tokenizer, [word])
    assert banned == [engine.tokenizer.encode(word, add_special_tokens=False),
                      engine.tokenizer.encode(" " + word, add_special_tokens=False)]
    expected = _text(engine, _generated(engine, 40, bad_words_ids=banned))
    choice = server.chat(ASK, max_tokens=40, extra_body={"bad_words": [word]}).choices[0]
    assert choice.message.content == expected and expected != _text(engine, _generated(engine, 40))


def test_include_stop_str_in_output_keeps_the_stop_string(server, engine):
    full = _text(engine, _generated(engine, 40))
    stop = full[2:5]
    for include, expected in ((True, full[:full.find(stop) + len(stop)]), (False, full[:full.find(stop)])):
        body = {"include_stop_str_in_output": include}
        assert server.chat(ASK, max_tokens=40, stop=[stop], extra_body=body).choices[0].message.content == expected
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in server.chat(
            ASK, max_tokens=40, stop=[stop], stream=True, extra_body=body) if chunk.choices)
        assert streamed == expected


def test_skip_special_tokens_false_shows_them(server, engine):
    special = engine.tokenizer.convert_tokens_to_ids("<image_placeholder>")
    body = {"allowed_token_ids": [special], "ignore_eos": True}
    shown = server.chat(ASK, max_tokens=3, extra_body={**body, "skip_special_tokens": False}).choices[0]
    hidden = server.chat(ASK, max_tokens=3, extra_body=body).choices[0]
    assert shown.message.content == "<image_placeholder>" * 3 and hidden.message.content == ""


@pytest.mark.parametrize("name, value", [("use_beam_search", True), ("best_of", 2), ("echo", True),
                                         ("chat_template", "{{ messages }}"), ("truncate_prompt_tokens", 5),
                                         ("prompt_logprobs", 1), ("length_penalty", 0.5),
                                         ("spaces_between_special_tokens", False)])
def test_vllm_options_vlmkit_lacks_are_a_400_unless_they_change_nothing(server, name, value):
    with pytest.raises(openai.BadRequestError, match=f"{name}: this vLLM option is not supported"):
        server.chat(ASK, max_tokens=2, extra_body={name: value})
    neutral = {"use_beam_search": False, "best_of": 1, "echo": False, "length_penalty": 1.0,
               "spaces_between_special_tokens": True}
    if name in neutral:
        assert server.chat(ASK, max_tokens=2, extra_body={name: neutral[name]}).choices


def _generated_from(engine, messages, max_new_tokens: int, **template_options) -> list[int]:
    inputs = engine.prepare_chat(messages, **template_options)
    output = engine.model.generate(**inputs, max_new_tokens=max_new_tokens, generation_mode="text")
    return output[0, inputs["input_ids"].shape[1]:].tolist()


def test_continue_final_message_continues_the_assistants_text(server, engine):
    started = ASK + [{"role": "assistant", "content": [{"type": "text", "text": "It is a"}]}]
    expected = _generated_from(engine, started, 12, add_generation_prompt=False, continue_final_message=True)
    answer = server.chat(started, max_tokens=12, extra_body={"add_generation_prompt": False,
                                                             "continue_final_message": True})
    # the continuation as it comes, its leading space included (nothing to strip after a started text)
    assert answer.choices[0].message.content == engine.tokenizer.decode(expected, skip_special_tokens=True)
    plain = server.chat(started, max_tokens=12)
    assert plain.usage.prompt_tokens > answer.usage.prompt_tokens  # a new turn: end of turn and a new header
    with pytest.raises(openai.BadRequestError, match="send add_generation_prompt: false too"):
        server.chat(started, max_tokens=2, extra_body={"continue_final_message": True})
    with pytest.raises(openai.BadRequestError, match="the final message must be the assistant's"):
        server.chat(ASK, max_tokens=2, extra_body={"add_generation_prompt": False, "continue_final_message": True})


def test_add_generation_prompt_false_leaves_the_assistant_header_out(server, engine):
    expected = _generated_from(engine, ASK, 12, add_generation_prompt=False)
    answer = server.chat(ASK, max_tokens=12, extra_body={"add_generation_prompt": False})
    assert answer.choices[0].message.content == _text(engine, expected)
    assert answer.usage.prompt_tokens < server.chat(ASK, max_tokens=1).usage.prompt_tokens


def test_chat_template_kwargs_reach_the_variables_the_template_reads(tmp_path):
    import shutil

    folder = shutil.copytree(builtin_model_path(), tmp_path / "hinted")
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").write_text("{% if tokenize %}T{% endif %}{% if size %}{{ hint|length }}{% endif %}"
                                                "{% if hint %}<|User|>: {{ hint }}\n\n{% endif %}" + template)
    engine = engine_for(folder)
    expected = _generated_from(engine, ASK, 12, hint="Answer in colours.")
    with serve(folder) as hinted:
        answer = hinted.chat(ASK, max_tokens=12, extra_body={"chat_template_kwargs": {
            "hint": "Answer in colours.", "messages": [], "tokenize": True, "unread": 1}})  # the server's own,
        plain = hinted.chat(ASK, max_tokens=12)  # the ones the prompt is built with, and unread ones: left out
        with pytest.raises(openai.BadRequestError, match="the chat template failed on the values it was given"):
            hinted.chat(ASK, max_tokens=2, extra_body={"chat_template_kwargs": {"hint": 5, "size": 3}})
        with pytest.raises(openai.BadRequestError, match="the prompt is .* characters long"):
            hinted.chat(ASK, max_tokens=2, extra_body={"chat_template_kwargs": {"hint": {"deep": ["x" * 10 ** 6]}}})
    assert answer.choices[0].message.content == _text(engine, expected)
    assert answer.usage.prompt_tokens > plain.usage.prompt_tokens


@pytest.mark.parametrize("extra", [
    {"structured_outputs": {"choice": ["left", "right"]}, "min_tokens": 10},  # the choice must end; min_tokens bans it
    {"guided_regex": "[0-9]", "min_tokens": 4},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "boolean"}}},
     "min_tokens": 6},
    {"structured_outputs": {"choice": ["left", "right"]}, "allowed_token_ids": [5, 6, 7]},
    {"allowed_token_ids": [385], "min_tokens": 3},  # only the end allowed, and the end held back
], ids=["choice", "regex", "schema", "allowed outside the grammar", "allowed only the end"])
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_options_that_leave_no_token_to_draw_are_a_400_not_a_broken_answer(server, extra, sampled):
    extra = dict(extra)
    options = dict(max_tokens=20, temperature=1.0, seed=1) if sampled else dict(max_tokens=20)
    if "response_format" in extra:
        options["response_format"] = extra.pop("response_format")
    with pytest.raises(openai.BadRequestError, match="leave no token that may come next"):
        server.chat(ASK, extra_body=extra, **options)
    assert server.chat(ASK, max_tokens=2).choices  # still serving


def test_min_tokens_holds_back_stop_strings_too(server, engine):
    """As vLLM: no stop string ends the answer before min_tokens tokens; then the text is searched from a
    stop's length before the text of the token that reached min_tokens."""
    wanted = 8
    tokens = _generated(engine, 20, min_new_tokens=wanted)
    full = _text(engine, tokens)
    stop = full[2]  # a character the answer has early on
    assert stop.strip() and full.index(stop) < len(_text(engine, tokens[:wanted - 1]))
    boundary = len(_text(engine, tokens[:wanted - 1]))
    position = full.find(stop, max(0, boundary - len(stop)))
    expected = full if position < 0 else full[:position]
    choice = server.chat(ASK, max_tokens=20, stop=[stop], extra_body={"min_tokens": wanted}).choices[0]
    assert choice.message.content == expected
    assert server.chat(ASK, max_tokens=20, stop=[stop]).choices[0].message.content == full[:full.index(stop)]


def test_top_k_minus_one_is_off_as_in_vllm(server):
    options = dict(max_tokens=10, temperature=1.3, seed=4)
    assert server.chat(ASK, extra_body={"top_k": -1}, **options).choices[0].message.content == \
        server.chat(ASK, extra_body={"top_k": 0}, **options).choices[0].message.content


def test_a_json_schema_of_true_takes_any_json_value(server):

    for extra in ({"guided_json": True}, {"structured_outputs": {"json": True}}):
        choice = server.chat(ASK, max_tokens=40, extra_body=extra).choices[0]
        if choice.finish_reason == "stop":
            json.loads(choice.message.content)
        assert choice.message.content


def test_continue_final_message_with_a_part_after_the_text_is_a_400_saying_so(server):
    ends_with_image = ASK + [{"role": "assistant", "content": [{"type": "text", "text": "It is"},
                                                               image_part(data_uri())]}]
    with pytest.raises(openai.BadRequestError, match="the text to continue must come last"):
        server.chat(ends_with_image, max_tokens=2, extra_body={"add_generation_prompt": False,
                                                              "continue_final_message": True})


def test_offline_chat_takes_vllms_chat_template_options(engine):
    started = ASK + [{"role": "assistant", "content": [{"type": "text", "text": "It is a"}]}]
    expected = _generated_from(engine, started, 12, add_generation_prompt=False, continue_final_message=True)
    llm = LLM(str(builtin_model_path()))
    output = llm.chat(started, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False,
                      add_generation_prompt=False, continue_final_message=True)
    assert output[0].outputs[0].text == engine.tokenizer.decode(expected, skip_special_tokens=True)
