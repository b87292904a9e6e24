"""vLLM's ``/tokenize`` and ``/detokenize`` on ``vlmkit serve``: a prompt's ids and a conversation's chat-prompt
ids (image tokens included) as transformers' tokenizer and processor give them, the count matching what a chat
request is billed, the text of ids back; bad bodies are 4xx naming the problem."""

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_support import data_uri, image_part, serve, user

from vlmkit.builtin import builtin_model_path

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def server():
    with serve(builtin_model_path()) as running:
        yield running


def post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=60)


def test_a_prompt_tokenizes_as_transformers_tokenizer_and_detokenizes_back(server):
    reference = transformers.AutoTokenizer.from_pretrained(builtin_model_path())
    text = "A red circle, then a blue square!"
    for add_special_tokens in (True, False):
        answer = post(server, "/tokenize", {"prompt": text, "add_special_tokens": add_special_tokens}).json()
        expected = reference(text, add_special_tokens=add_special_tokens)["input_ids"]
        assert answer["tokens"] == expected and answer["count"] == len(expected)
        assert answer["max_model_len"] > len(expected)
        back = post(server, "/detokenize", {"tokens": answer["tokens"]}).json()
        assert back["prompt"] == reference.decode(expected)
    assert reference.decode(expected) == text


def test_messages_tokenize_as_the_chat_request_builds_its_prompt(server):
    uri = data_uri(40, 30, seed=2)
    messages = user(image_part(uri), "What is in this picture?")
    answer = post(server, "/tokenize", {"messages": messages}).json()
    chat = server.chat(messages, max_tokens=1)
    assert answer["count"] == chat.usage.prompt_tokens == len(answer["tokens"])
    # transformers' processor on the same conversation and picture
    processor = transformers.AutoProcessor.from_pretrained(builtin_model_path(), backend="pil")
    picture = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")
    conversation = [{"role": "user", "content": [{"type": "image", "image": picture},
                                                 {"type": "text", "text": "What is in this picture?"}]}]
    expected = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                             return_dict=True, return_tensors="np")["input_ids"]
    assert answer["tokens"] == np.asarray(expected)[0].tolist()
    continued = post(server, "/tokenize", {"messages": messages + [
        {"role": "assistant", "content": "It is"}], "add_generation_prompt": False, "continue_final_message": True})
    assert continued.json()["count"] > answer["count"]


@pytest.mark.parametrize("path, body, status, phrase", [
    ("/tokenize", {"prompt": "a", "messages": user("b")}, 400, "either prompt"),
    ("/tokenize", {}, 400, "one of prompt (text) or messages (a conversation) is required"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"prompt": "a", "model": "other"}, 404, "does not exist"),
    ("/tokenize", {"prompt": "word " * 3_000_000}, 400, "the prompt is"),
    ("/tokenize", {"messages": user("a"), "continue_final_message": True, "add_generation_prompt": False}, 400,
     "the final message must be the assistant's"),
    ("/detokenize", {"tokens": [10 ** 7]}, 400, "tokens: ids [10000000] are outside"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"tokens": "1 2"}, 400, "tokens"),
])
def test_bad_bodies_are_4xx_naming_the_problem(server, path, body, status, phrase):
    response = post(server, path, body)
    assert response.status_code == status, response.text
    assert phrase in response.json()["error"]["message"]


def test_return_token_strs_gives_each_tokens_vocabulary_entry_as_vllm(server):
    reference = transformers.AutoTokenizer.from_pretrained(builtin_model_path())
    for body in ({"prompt": "A red circle"}, {"messages": user("A red circle")}):
        answer = post(server, "/tokenize", {**body, "return_token_strs": True}).json()
        assert answer["token_strs"] == reference.convert_ids_to_tokens(answer["tokens"])
        assert post(server, "/tokenize", body).json()["token_strs"] is None


@pytest.mark.parametrize("options", [{"add_generation_prompt": False},
                                     {"add_generation_prompt": False, "continue_final_message": True}])
def test_an_empty_content_list_is_empty_text_as_null_is(server, options):
    def conversation(content):
        return user("Hi") + [{"role": "assistant", "content": content}]

    tokens = [post(server, "/tokenize", {"messages": conversation(content), **options}).json().get("tokens")
              for content in ([], None, "")]
    assert tokens[0] is not None and tokens[0] == tokens[1] == tokens[2]
    chat = post(server, "/v1/chat/completions", {"messages": conversation([]), "max_tokens": 2, **options})
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["prompt_tokens"] == len(tokens[0])
