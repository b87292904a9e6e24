"""Raw multimodal prompts, vLLM's ``{"prompt": text, "multi_modal_data": {"image": ...}}``: ``LLM.generate``
and ``/v1/completions`` (its ``multi_modal_data`` of URLs) continue a prompt written in the family's own
format, each image placeholder expanded as transformers' processor expands that text, and give
transformers' greedy tokens on all three families, with one image and with two; bad requests are 400s (or
``InputError``s) naming the problem."""

import base64
import functools
import io

import httpx
import pytest
import torch
from serve_support import engine_for, serve

from vlmkit.batch import LLM, SamplingParams
from vlmkit.errors import InputError
from vlmkit.serve.config import ServeConfig, ServeLimits

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread (conftest.py)

NEW_TOKENS = 8
IMAGE = object()  # where an image goes in a prompt, written below as the family's placeholder
# each family's raw prompt as items (texts and images), and the placeholder its processor expands
FAMILIES = {
    "janus": ("janus_dir", "<image_placeholder>",
              ["<|User|>: ", IMAGE, "\nWhat is shown in this image?\n\n<|Assistant|>:"]),
    "llava_onevision": ("llava_onevision_dir", "<image>",
                        ["<|im_start|>user ", IMAGE, "\nWhat is shown in this image?<|im_end|><|im_start|>assistant\n"]),
    "idefics": ("idefics_resampler_dir", "<image>",
                ["User:", IMAGE, "What is shown in this image?<end_of_utterance>\nAssistant:"]),
}
TWO_IMAGES = {  # a second image after the question
    "janus": ["<|User|>: ", IMAGE, " and ", IMAGE, "\nWhich is brighter?\n\n<|Assistant|>:"],
    "llava_onevision": ["<|im_start|>user ", IMAGE, IMAGE, "\nWhich is brighter?<|im_end|><|im_start|>assistant\n"],
    "idefics": ["User:", IMAGE, "and", IMAGE, "Which is brighter?<end_of_utterance>\nAssistant:"],
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    name = request.param
    path = request.getfixturevalue(FAMILIES[name][0])
    llm = LLM.from_engine(engine_for(path), ServeConfig(model=str(path)), concurrency=2)
    with serve(path) as server:
        yield name, path, server, llm
    llm.close()


@functools.lru_cache(maxsize=3)
def _reference(name: str, path: str):
    """transformers' (processor, model in fp32)."""
    if name == "llava_onevision":
        from builders.llava_onevision import reference_processor
        processor = reference_processor(path)
    else:
        processor = transformers.AutoProcessor.from_pretrained(path, backend="pil")
    model_class = transformers.IdeficsForVisionText2Text if name == "idefics" else \
        transformers.AutoModelForImageTextToText
    return processor, model_class.from_pretrained(path, dtype=torch.float32).eval()


def _raw(name: str, items: list) -> str:
    return "".join(FAMILIES[name][1] if item is IMAGE else item for item in items)


def _reference_answer(name: str, path, items: list, images: list) -> tuple[str, int, int]:
    """(text, prompt tokens, completion tokens) of transformers' greedy answer to the raw prompt: its processor
    called with text=the prompt, images=the images (IDEFICS: its interleaved list of texts and images)."""
    processor, model = _reference(name, str(path))
    if name == "idefics":
        pictures = iter(images)
        inputs = processor(text=[[next(pictures) if item is IMAGE else item for item in items]], return_tensors="pt")
    else:
        inputs = processor(text=_raw(name, items), images=images, return_tensors="pt")
    prompt = inputs["input_ids"].shape[1]
    with torch.no_grad():
        new = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[0, prompt:].tolist()
    eos = set(engine_for(path).model.generation_config.eos_token_ids)
    ended = next((i for i, token in enumerate(new) if token in eos), None)
    text = processor.tokenizer.decode(new[:ended], skip_special_tokens=True)
    return text, prompt, len(new) if ended is None else ended + 1


def _data_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _post(server, body: dict) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", json=body, timeout=120)


@pytest.mark.parametrize("count", [1, 2])
def test_generate_and_the_endpoint_answer_a_raw_image_prompt_as_transformers(family, sample_images, count):
    name, path, server, llm = family
    items = FAMILIES[name][2] if count == 1 else TWO_IMAGES[name]
    images = [sample_images["square"], sample_images["wide"]][:count]
    text, prompt_tokens, completion_tokens = _reference_answer(name, path, items, images)
    prompt = _raw(name, items)

    output, = llm.generate({"prompt": prompt, "multi_modal_data": {"image": images if count > 1 else images[0]}},
                           SamplingParams(temperature=0, max_tokens=NEW_TOKENS), use_tqdm=False)
    assert (output.text, output.prompt_tokens, output.completion_tokens) == (text, prompt_tokens, completion_tokens)

    response = _post(server, {"prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0,
                              "multi_modal_data": {"image": [_data_uri(image) for image in images]}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["text"] == text
    assert (body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]) == (prompt_tokens, completion_tokens)


def test_a_placeholder_count_that_does_not_match_the_images_is_a_400_naming_both(family, sample_images):
    name, _, server, llm = family
    placeholder = FAMILIES[name][1]
    uri = _data_uri(sample_images["square"])
    for prompt, images, counts in [("Describe it.", [uri], ("holds 0", "has 1")),
                                   (_raw(name, TWO_IMAGES[name]), [uri], ("holds 2", "has 1"))]:
        response = _post(server, {"prompt": prompt, "max_tokens": 2, "multi_modal_data": {"image": images}})
        assert response.status_code == 400, response.text
        message = response.json()["error"]["message"]
        assert all(part in message for part in (*counts, placeholder, "placeholder")), message
    with pytest.raises(InputError, match="holds 0 image placeholder"):
        llm.generate({"prompt": "Describe it.", "multi_modal_data": {"image": sample_images["square"]}},
                     use_tqdm=False)


def test_bad_multimodal_completion_requests_are_400s_naming_the_problem(llava_onevision_dir, sample_images):
    prompt = "<|im_start|>user <image>\nWhat?<|im_end|><|im_start|>assistant\n"
    uri = _data_uri(sample_images["square"])
    cases = [
        ({"prompt": [1, 2, 3], "multi_modal_data": {"image": [uri]}}, ["multi_modal_data", "token ids"]),
        ({"prompt": [prompt, prompt], "multi_modal_data": {"image": [uri]}}, ["one text prompt", "2 prompts"]),
        ({"prompt": prompt, "multi_modal_data": {"image": [uri, uri]}}, ["holds 1", "has 2"]),
        ({"prompt": prompt, "multi_modal_data": {}}, ["multi_modal_data", "no image"]),
        ({"prompt": prompt, "multi_modal_data": {"audio": [uri]}}, ["'audio'", "'image'"]),
        ({"prompt": prompt, "multi_modal_data": {"image": ["ftp://example.com/a.png"]}},
         ["multi_modal_data.image[0]", "'ftp'"]),
        ({"prompt": prompt, "multi_modal_data": {"image": ["/etc/hostname"]}},
         ["multi_modal_data.image[0]", "--media-root"]),
        ({"prompt": prompt, "multi_modal_data": {"image": ["data:image/png;base64,bm90IGFuIGltYWdl"]}},
         ["multi_modal_data.image[0]"]),
        ({"prompt": prompt + "<image><image>", "multi_modal_data": {"image": [uri] * 3}}, ["3 images", "--max-images"]),
    ]
    with serve(llava_onevision_dir, limits={"max_images": 2}) as server:
        for body, names in cases:
            response = _post(server, {"max_tokens": 2, **body})
            assert response.status_code == 400, (body, response.text)
            message = response.json()["error"]["message"]
            assert all(name in message for name in names), (names, message)


def test_video_for_a_family_without_it_and_urls_in_idefics_text_are_400s(janus_dir, idefics_resampler_dir,
                                                                       sample_images):
    uri = _data_uri(sample_images["square"])
    with serve(janus_dir) as server:
        response = _post(server, {"prompt": "<image_placeholder> and <video>", "max_tokens": 2,
                                  "multi_modal_data": {"image": [uri], "video": ["https://example.com/v.mp4"]}})
        assert response.status_code == 400 and "does not take video" in response.json()["error"]["message"]
    with serve(idefics_resampler_dir) as server:
        # IDEFICS' processor fetches a text item that reads as a URL: the server's media policy would not apply
        response = _post(server, {"prompt": "User:<image>https://example.com/b.png", "max_tokens": 2,
                                  "multi_modal_data": {"image": [uri]}})
        assert response.status_code == 400 and "image URL" in response.json()["error"]["message"]


def test_generate_refuses_multimodal_data_it_cannot_send(janus_dir, sample_images):
    llm = LLM.from_engine(engine_for(janus_dir), ServeConfig(model=str(janus_dir), limits=ServeLimits(max_images=1)))
    image = sample_images["square"]
    try:
        for prompt, names in [
            ({"prompt_token_ids": [1, 2], "multi_modal_data": {"image": image}}, ["prompt 0", "text 'prompt'"]),
            ({"prompt": "<image_placeholder>", "multi_modal_data": {"image": 3}}, ["multi_modal_data['image'][0]",
                                                                                   "int"]),
            ({"prompt": "<image_placeholder>", "multi_modal_data": {"image": []}}, ["empty"]),
            ({"prompt": "<image_placeholder>", "multi_modal_data": image}, ["multi_modal_data must be a dict"]),
            ({"prompt": "<image_placeholder><image_placeholder>", "multi_modal_data": {"image": [image, image]}},
             ["2 images", "--max-images"]),
        ]:
            with pytest.raises(InputError) as caught:
                llm.generate(prompt, use_tqdm=False)
            assert all(name in str(caught.value) for name in names), (names, str(caught.value))
    finally:
        llm.close()


def test_a_video_prompt_is_answered_as_transformers_answers_it(llava_onevision_dir, onevision_videos):
    clip = onevision_videos["clip"]
    prompt = "<|im_start|>user <video>\nWhy is this video funny?<|im_end|><|im_start|>assistant\n"
    processor, model = _reference("llava_onevision", str(llava_onevision_dir))
    inputs = processor(text=prompt, videos=str(clip), num_frames=8, do_sample_frames=True, return_tensors="pt")
    with torch.no_grad():
        new = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    eos = set(engine_for(llava_onevision_dir).model.generation_config.eos_token_ids)
    ended = next((i for i, token in enumerate(new.tolist()) if token in eos), None)
    expected = processor.tokenizer.decode(new[:ended], skip_special_tokens=True)

    media = {"video": [{"url": str(clip), "num_frames": 8}]}
    with serve(llava_onevision_dir, media_root=str(clip.parent)) as server:
        response = _post(server, {"prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0,
                                  "multi_modal_data": media})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == expected
        assert response.json()["usage"]["prompt_tokens"] == inputs["input_ids"].shape[1]
    llm = LLM.from_engine(engine_for(llava_onevision_dir),
                          ServeConfig(model=str(llava_onevision_dir), media_root=str(clip.parent)))
    try:
        output, = llm.generate({"prompt": prompt, "multi_modal_data": media},
                               SamplingParams(temperature=0, max_tokens=NEW_TOKENS), use_tqdm=False)
        assert output.text == expected
        with pytest.raises(InputError, match="must be uint8"):  # float frames: 0..255 integers only
            llm.generate({"prompt": prompt, "multi_modal_data": {"video": [torch.zeros(2, 8, 8, 3)]}}, use_tqdm=False)
    finally:
        llm.close()
