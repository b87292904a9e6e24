"""``POST /v1/completions`` (OpenAI's text completions, as vLLM serves them) and ``LLM.generate``: a prompt
continued as it is, with no chat template, giving transformers' greedy tokens on all three families; token-id
prompts, lists of prompts (choice p * n + i), echo, logprobs in the completions shape, streaming, batch rows,
and 400s naming what is wrong."""

import httpx
import pytest
import torch
from serve_support import engine_for, serve, stats_when

from vlmkit.batch import LLM, SamplingParams
from vlmkit.batch.rows import BatchRequest
from vlmkit.errors import InputError
from vlmkit.serve.config import ServeConfig

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread (conftest.py)

PROMPT = "The cat sat on the mat and"
NEW_TOKENS = 8
FAMILIES = {"janus": "janus_dir", "llava_onevision": "llava_onevision_dir", "idefics": "idefics_resampler_dir"}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    path = request.getfixturevalue(FAMILIES[request.param])
    with serve(path) as server:
        yield request.param, path, server


def _reference_new_tokens(name: str, path, input_ids: torch.Tensor) -> list[int]:
    """transformers' greedy continuation of a text-only prompt."""
    model_class = transformers.IdeficsForVisionText2Text if name == "idefics" else \
        transformers.AutoModelForImageTextToText
    model = model_class.from_pretrained(path, dtype=torch.float32).eval()
    options = dict(max_new_tokens=NEW_TOKENS, do_sample=False, attention_mask=torch.ones_like(input_ids))
    if name == "idefics":  # its forward demands images: a blank one that no token attends to reads as no image
        size = model.config.vision_config.image_size
        options.update(pixel_values=torch.zeros(1, 1, 3, size, size),
                       image_attention_mask=torch.zeros(1, input_ids.shape[1], 1, dtype=torch.long))
    output = model.generate(input_ids, **options)
    return output[0, input_ids.shape[1]:].tolist()


def _completion(server, **body) -> dict:
    response = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_completion_continues_the_prompt_as_transformers_generate(family):
    name, path, server = family
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    expected = _reference_new_tokens(name, path, input_ids)
    eos = set(engine_for(path).model.generation_config.eos_token_ids)
    ended = next((i for i, token in enumerate(expected) if token in eos), None)
    answer = tokenizer.decode(expected[:ended], skip_special_tokens=True)

    body = server.openai().completions.create(model=server.config.model_name, prompt=PROMPT, max_tokens=NEW_TOKENS,
                                              temperature=0)
    assert body.object == "text_completion" and body.id.startswith("cmpl-")
    assert body.choices[0].text == answer
    assert body.choices[0].finish_reason == ("stop" if ended is not None else "length")
    assert body.usage.prompt_tokens == input_ids.shape[1]
    assert body.usage.completion_tokens == (ended + 1 if ended is not None else NEW_TOKENS)
    as_ids = _completion(server, prompt=input_ids[0].tolist(), max_tokens=NEW_TOKENS, temperature=0)
    assert as_ids["choices"][0]["text"] == answer


def test_each_prompt_of_a_list_gets_its_n_choices_as_when_sent_alone(family):
    _, _, server = family
    prompts = [PROMPT, "A red circle"]
    together = _completion(server, prompt=prompts, n=2, max_tokens=5, temperature=1.0, seed=11)
    alone = [_completion(server, prompt=p, n=2, max_tokens=5, temperature=1.0, seed=11) for p in prompts]
    assert [c["index"] for c in together["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in together["choices"]] == [c["text"] for body in alone for c in body["choices"]]
    assert together["usage"]["completion_tokens"] == sum(body["usage"]["completion_tokens"] for body in alone)


def test_echo_and_logprobs_take_the_completions_shape_streamed_or_not(family):
    _, path, server = family
    options = dict(prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2, n=2)
    plain = _completion(server, **options)
    with server.openai().completions.create(model=server.config.model_name, stream=True,
                                            stream_options={"include_usage": True}, **options) as stream:
        chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == plain["usage"]["completion_tokens"]
    for choice in plain["choices"]:
        logprobs = choice["logprobs"]
        assert "".join(logprobs["tokens"]) == choice["text"] or choice["finish_reason"] == "stop"
        assert logprobs["text_offset"] == [sum(map(len, logprobs["tokens"][:i])) for i in range(len(logprobs["tokens"]))]
        assert all(len(top) <= 2 and lp <= 0 for top, lp in zip(logprobs["top_logprobs"], logprobs["token_logprobs"]))
        streamed = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice["index"]]
        assert "".join(c.text for c in streamed) == choice["text"]
        assert [t for c in streamed if c.logprobs for t in c.logprobs.tokens] == logprobs["tokens"]
        assert [o for c in streamed if c.logprobs for o in c.logprobs.text_offset] == logprobs["text_offset"]
        assert streamed[-1].finish_reason == choice["finish_reason"]
    echoed = _completion(server, prompt=PROMPT, max_tokens=6, temperature=0, echo=True)
    assert echoed["choices"][0]["text"] == PROMPT + plain["choices"][0]["text"]


@pytest.mark.parametrize("body, names", [
    ({"prompt": []}, ["prompt", "empty list"]),
    ({"prompt": [[]]}, ["prompt", "empty"]),
    ({"prompt": [10 ** 8]}, ["token id 100000000", "vocabulary"]),
    ({"prompt": 5}, ["prompt"]),
    ({"prompt": "a", "echo": True, "logprobs": 1}, ["echo", "logprobs"]),
    ({"prompt": "a", "suffix": "b"}, ["suffix"]),
    ({"prompt": "a", "logprobs": 21}, ["logprobs"]),
    ({"prompt": "a", "max_tokens": 0}, ["max_tokens"]),
    ({"prompt": "a", "max_tokens": 10 ** 6}, ["max_tokens", "context"]),
    ({"prompt": ["a"] * 5, "n": 2}, ["5 prompts x n=2", "--max-n"]),
    ({"prompt": "a", "best_of": 2}, ["best_of"]),
    ({"prompt": "a", "tools": [{"type": "function", "function": {"name": "f"}}]}, ["tools", "/v1/chat/completions"]),
    ({"messages": [{"role": "user", "content": "Hi"}]}, ["prompt"]),
])
def test_a_bad_completion_request_is_a_400_naming_the_problem(family, body, names):
    _, _, server = family
    response = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    for name in names:
        assert name in message


def test_batch_rows_and_llm_generate_answer_completions_as_the_server(janus_dir):
    engine = engine_for(janus_dir)
    with serve(janus_dir) as server:
        expected = _completion(server, prompt=PROMPT, max_tokens=5, temperature=0)["choices"][0]["text"]
    llm = LLM.from_engine(engine, ServeConfig(model=str(janus_dir)), concurrency=2)
    try:
        rows = llm.worker.run([BatchRequest("a", "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 5,
                                                                             "temperature": 0})])
        (_, status, body), = list(rows)
        assert status == 200 and body["choices"][0]["text"] == expected
        ids = engine.tokenizer(PROMPT)["input_ids"]
        outputs = llm.generate([PROMPT, {"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=5),
                               use_tqdm=False)
        assert [o.text for o in outputs] == [expected, expected]
        for bad, names in [({"prompt": PROMPT, "multi_modal_data": {}}, ["multi_modal_data", "'image'"]),
                           ({"prompt_token_ids": []}, ["prompt_token_ids"]), ([3], ["prompt 0 is a int"])]:
            with pytest.raises(InputError) as caught:
                llm.generate(bad, use_tqdm=False)
            for name in names:
                assert name in str(caught.value)
    finally:
        llm.close()


def test_a_streamed_completion_whose_client_goes_away_frees_its_rows(janus_dir):
    with serve(janus_dir) as server:
        before = server.stats()["cancelled"]
        body = {"prompt": [PROMPT, "A red circle"], "stream": True, "max_tokens": 400, "ignore_eos": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    break  # leave after the first chunk
        stats = stats_when(server, lambda stats: stats["cancelled"] >= before + 2 and stats["running_rows"] == 0)
    assert stats["cancelled"] == before + 2 and stats["running_rows"] == 0 and stats["completed"] == 0


def test_a_placeholder_without_multi_modal_data_is_a_400_saying_where_images_go(family):
    from vlmkit.serve.completions import placeholders

    _, path, server = family
    engine = engine_for(path)
    mark = placeholders(engine)["image"]
    as_ids = engine.tokenizer(f"{mark} What is it?")["input_ids"]
    for prompt in (f"{mark} What is it?", as_ids):
        response = httpx.post(server.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 2}, timeout=60)
        assert response.status_code == 400, response.text
        message = response.json()["error"]["message"]
        assert f"1 image placeholder(s) ({mark})" in message and "multi_modal_data" in message, message
        assert "pixel_values" not in message
