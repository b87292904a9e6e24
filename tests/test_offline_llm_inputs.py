"""The offline ``vlmkit.LLM`` API refuses misuse with an ``InputError`` that names the problem and the fix,
never an AttributeError or TypeError from deep inside: constructor arguments are checked before the model
loads; ``chat`` takes a conversation or a list of them (a plain string is not one), string content parts
are text parts (as in vLLM), ``image_pil`` parts take PIL images, arrays and tensors but not paths,
``sampling_params`` may be a dict of ``SamplingParams`` fields, and a closed LLM says it is closed."""

import numpy as np
import pytest
import torch
from batch_support import serve_config
from PIL import Image
from serve_support import engine_for

from vlmkit.batch import LLM, SamplingParams
from vlmkit.errors import InputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny model: one thread (conftest.py)

GREEDY = SamplingParams(temperature=0, max_tokens=2)
# a checkpoint that does not exist: had the check come after loading, the error would name the checkpoint
MISSING = "/nonexistent/vlmkit-checkpoint"


@pytest.fixture(scope="module")
def llm(janus_dir):
    llm = LLM.from_engine(engine_for(janus_dir), serve_config(janus_dir), concurrency=2)
    yield llm
    llm.close()


def ask(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


@pytest.mark.parametrize("kwargs, names", [
    (dict(concurrency=0), ["concurrency", "at least 1", "0"]),
    (dict(concurrency="4"), ["concurrency", "'4'"]),
    (dict(limits={"bogus": 1}), ["unknown limit", "'bogus'", "max_images"]),
    (dict(limits={"max_images": 0}), ["limits['max_images']", "at least 1"]),
    (dict(limits="max_images=2"), ["limits must be a ServeLimits or a dict"]),
    (dict(media_root="/nonexistent/media"), ["media_root", "no such folder", "/nonexistent/media"]),
    (dict(media_root=__file__), ["media_root", "is a file"]),
    (dict(bogus_setting=1), ["unknown LLM setting", "bogus_setting", "max_batch_rows"]),
])
def test_bad_constructor_arguments_are_refused_before_the_model_loads(kwargs, names):
    with pytest.raises(InputError) as caught:
        LLM(MISSING, **kwargs)
    for name in names:
        assert name in str(caught.value)
    assert "checkpoint" not in str(caught.value)


def test_an_empty_model_is_refused():
    with pytest.raises(InputError, match="model must be a checkpoint folder"):
        LLM("")


@pytest.mark.parametrize("messages, names", [
    ("hello", ["chat takes a conversation", "got str", "[{'role': 'user', 'content': text}]"]),
    (["hello", "world"], ["chat takes a conversation", "conversation 0 is of type str"]),
    ([[{"role": "user", "content": "hi"}, "oops"]], ["conversation 0, message 1 is of type str", "'role'"]),
    (42, ["chat takes a conversation", "got int"]),
    ({"role": "user", "content": "hi"}, ["got one message (a dict); wrap it in a list"]),
    (ask({"type": "text", "text": "hi"}, 7), ["conversation 0, message 0, content part 1 is of type int"]),
])
def test_chat_refuses_what_is_not_a_conversation(llm, messages, names):
    with pytest.raises(InputError) as caught:
        llm.chat(messages, GREEDY, use_tqdm=False)
    for name in names:
        assert name in str(caught.value)


def test_a_string_content_part_is_a_text_part_as_in_vllm(llm):
    as_string = llm.chat(ask("Hi there"), GREEDY, use_tqdm=False)[0].text
    as_part = llm.chat(ask({"type": "text", "text": "Hi there"}), GREEDY, use_tqdm=False)[0].text
    assert as_string == as_part


def test_image_pil_takes_arrays_and_tensors_as_the_same_pixels(llm):
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    answers = [llm.chat(ask({"type": "image_pil", "image_pil": image}, "What is this?"), GREEDY,
                        use_tqdm=False)[0].text
               for image in (Image.fromarray(pixels), pixels, torch.from_numpy(pixels).permute(2, 0, 1))]
    assert answers[0] == answers[1] == answers[2]


def test_image_pil_in_a_mode_png_cannot_hold_is_sent_as_rgb(llm):
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))
    rgb = cmyk.convert("RGB")
    answers = [llm.chat(ask({"type": "image_pil", "image_pil": image}, "What is this?"), GREEDY,
                        use_tqdm=False)[0].text for image in (cmyk, rgb)]
    assert answers[0] == answers[1]


@pytest.mark.parametrize("image, names", [
    ("/tmp/picture.png", ["content part 0", "not a path", "'/tmp/picture.png'", "PIL.Image.open", "media_root"]),
    (np.zeros((2, 3, 4, 5), np.uint8), ["content part 0", "(2, 3, 4, 5)", "is not an image"]),
    (3.5, ["content part 0", "takes a PIL image", "got float"]),
    (None, ["content part 0", "needs its image under 'image_pil'"]),
])
def test_image_pil_refuses_what_is_not_an_image(llm, image, names):
    with pytest.raises(InputError) as caught:
        llm.chat(ask({"type": "image_pil", "image_pil": image}, "What is this?"), GREEDY, use_tqdm=False)
    for name in names:
        assert name in str(caught.value)


def test_sampling_params_may_be_a_dict_of_its_fields(llm):
    as_dict = llm.chat(ask("Count"), {"temperature": 0, "max_tokens": 3}, use_tqdm=False)[0]
    as_params = llm.chat(ask("Count"), SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0]
    assert as_dict.text == as_params.text and as_dict.completion_tokens == as_params.completion_tokens
    per_conversation = llm.chat([ask("Count"), ask("Count")], [{"temperature": 0, "max_tokens": 3}, as_params_of(3)],
                                use_tqdm=False)
    assert [o.text for o in per_conversation] == [as_params.text] * 2


def test_openai_penalties_and_logit_bias_reach_the_request_as_vllm_names_them(llm):
    tokenizer = llm.worker.engine.processor.tokenizer
    token = tokenizer.encode(" blue", add_special_tokens=False)[-1]
    forced = llm.chat(ask("Count"), SamplingParams(temperature=0, max_tokens=3, logit_bias={token: 100}),
                      use_tqdm=False)[0]
    assert forced.text == tokenizer.decode([token] * 3).strip()
    penalised = SamplingParams(temperature=0, max_tokens=6, presence_penalty=-2.0, frequency_penalty=-2.0)
    body = {"messages": [{"role": "user", "content": "Count"}], "max_tokens": 6, "temperature": 0, "presence_penalty": -2.0,
            "frequency_penalty": -2.0}
    as_request = llm._run("/v1/chat/completions", [body], "conversation", use_tqdm=False)[0]
    got = llm.chat(ask("Count"), penalised, use_tqdm=False)[0]
    assert got.text == as_request["choices"][0]["message"]["content"]
    assert got.text != llm.chat(ask("Count"), as_params_of(6), use_tqdm=False)[0].text
    with pytest.raises(InputError, match="logit_bias"):
        llm.chat(ask("Count"), SamplingParams(logit_bias={token: 101}), use_tqdm=False)


def as_params_of(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens)


@pytest.mark.parametrize("params, names", [
    ({"temprature": 0}, ["unknown sampling parameter", "'temprature'", "temperature"]),
    (0.5, ["sampling_params must be a SamplingParams, a dict", "got float"]),
])
def test_bad_sampling_params_are_named(llm, params, names):
    with pytest.raises(InputError) as caught:
        llm.chat(ask("Hi"), params, use_tqdm=False)
    for name in names:
        assert name in str(caught.value)


@pytest.mark.parametrize("prompts, shown", [(5, "got int 5"), (["a cat", None], "got NoneType None")])
def test_generate_images_takes_prompts_only(llm, prompts, shown):
    with pytest.raises(InputError, match="generate_images takes a prompt") as caught:
        llm.generate_images(prompts, use_tqdm=False)
    assert shown in str(caught.value)


def test_a_closed_llm_says_so(janus_dir):
    llm = LLM.from_engine(engine_for(janus_dir), serve_config(janus_dir), concurrency=1)
    with llm:
        assert llm.chat(ask("Hi"), GREEDY, use_tqdm=False)[0].completion_tokens >= 1
    llm.close()  # twice is harmless
    for call in (lambda: llm.chat(ask("Hi"), GREEDY, use_tqdm=False),
                 lambda: llm.generate_images("a cat", use_tqdm=False)):
        with pytest.raises(InputError, match="this LLM is closed"):
            call()


def test_from_engine_checks_concurrency(janus_dir):
    with pytest.raises(InputError, match="concurrency must be a whole number of at least 1, got 0"):
        LLM.from_engine(engine_for(janus_dir), serve_config(janus_dir), concurrency=0)


def test_generate_images_takes_the_checkpoints_guidance_unless_given(janus_dir, tmp_path):
    """As ``vlmkit imagine`` and the server: an unset guidance_scale is the checkpoint's generation_config.json's."""
    import json
    import shutil

    folder = shutil.copytree(janus_dir, tmp_path / "guided")
    path = folder / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "guidance_scale": 1.5}))
    with LLM.from_engine(engine_for(folder), serve_config(folder)) as llm:
        default = llm.generate_images("a red circle", seed=4, use_tqdm=False)[0][0]
        given = llm.generate_images("a red circle", seed=4, guidance_scale=1.5, use_tqdm=False)[0][0]
        other = llm.generate_images("a red circle", seed=4, guidance_scale=5.0, use_tqdm=False)[0][0]
    assert default.tobytes() == given.tobytes() != other.tobytes()


@pytest.mark.parametrize("top_k", [None, "5", -5, 2.5, True])
def test_a_top_k_vllm_refuses_is_an_input_error_naming_it(llm, top_k):
    for params in (SamplingParams(top_k=top_k, max_tokens=2), {"top_k": top_k, "max_tokens": 2}):
        with pytest.raises(InputError, match="top_k"):
            llm.chat(ask("Hi"), params, use_tqdm=False)


def test_numpy_and_tensor_token_ids_are_prompts_as_lists_are(llm):
    ids = [5, 17, 42]
    expected = llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)[0].text
    for given in (np.array(ids), list(np.array(ids)), torch.tensor(ids)):
        assert llm.generate({"prompt_token_ids": given}, GREEDY, use_tqdm=False)[0].text == expected


@pytest.mark.parametrize("kwargs, names, unwanted", [
    (dict(dtype="int8"), ["dtype='int8'", "quantize='int8'"], "quantization_config"),
    (dict(quantize="int3"), ["unknown quantization 'int3'"], "quantization_config"),
    (dict(device="tpu"), ["device='tpu'"], "device_map"),
    (dict(tensor_parallel_size=2), ["tensor_parallel_size=2", "one device"], None),
    (dict(max_model_len=64), ["max_model_len=64", "model's own context"], None),
    (dict(limit_mm_per_prompt={"audio": 1}), ["limit_mm_per_prompt takes {'image': N}"], None),
    (dict(seed="1"), ["seed must be a whole number"], None),
])
def test_load_options_and_vllm_settings_are_checked_in_llms_own_names(kwargs, names, unwanted):
    with pytest.raises(InputError) as caught:
        LLM(MISSING, **kwargs)
    for name in names:
        assert name in str(caught.value)
    assert "checkpoint" not in str(caught.value) and (unwanted is None or unwanted not in str(caught.value))


def test_vllms_llm_settings_that_vlmkit_honours_are_taken(janus_dir):
    with LLM(str(janus_dir), seed=7, limit_mm_per_prompt={"image": 1}, tensor_parallel_size=1,
             trust_remote_code=True, concurrency=2) as llm:
        assert llm.worker.config.limits.max_images == 1
        params = SamplingParams(temperature=1.0, max_tokens=4)
        first = [output.text for output in llm.chat([ask("Hi"), ask("Hi")], params, use_tqdm=False)]
        assert [output.text for output in llm.chat([ask("Hi"), ask("Hi")], params, use_tqdm=False)] == first
