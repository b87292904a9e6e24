"""Video frames held in memory, vLLM's offline form (``multi_modal_data={"video": frames}``, a chat's
``{"type": "video", "video": frames}`` part): ``LLM.generate`` and ``LLM.chat`` send them through the request
path as a lossless ``data:application/x-npy`` URI, which HTTP clients may send too, and the answer is
transformers' for ``processor(text=..., videos=frames)``: every frame as given (its video processor does not
sample a frames array unless asked to), or ``num_frames`` of them sampled as a video file's are. Bad frames are
``InputError``s (400s over HTTP) naming the problem."""

import base64
import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from serve_support import engine_for, serve

from vlmkit.batch import LLM, SamplingParams
from vlmkit.errors import InputError, MediaError
from vlmkit.io.video import FRAMES_MEDIA_TYPE, frames_data_uri, load_video
from vlmkit.serve.config import ServeConfig, ServeLimits

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread (conftest.py)

NEW_TOKENS = 8
PROMPT = "<|im_start|>user <video>\nWhat happens in this video?<|im_end|><|im_start|>assistant\n"
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS)


def noise_frames(count: int = 6, height: int = 40, width: int = 56, seed: int = 0) -> np.ndarray:
    """Frames of random pixels: any lossy codec on the way would change them."""
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def reference(llava_onevision_dir):
    """transformers' processor (video processor without torchvision: builders.llava_onevision) and fp32 model."""
    from builders.llava_onevision import reference_processor

    model = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(llava_onevision_dir,
                                                                                dtype=torch.float32).eval()
    return reference_processor(llava_onevision_dir), model


@pytest.fixture(scope="module")
def llm(llava_onevision_dir):
    llm = LLM.from_engine(engine_for(llava_onevision_dir), ServeConfig(model=str(llava_onevision_dir)), concurrency=2)
    yield llm
    llm.close()


def reference_answer(reference, eos, text: str, frames: np.ndarray, **video_options) -> tuple[str, int, int]:
    """(text, prompt tokens, completion tokens) of transformers' greedy answer to processor(text, videos=frames)."""
    processor, model = reference
    inputs = processor(text=text, videos=frames, return_tensors="pt", **video_options)
    prompt = inputs["input_ids"].shape[1]
    with torch.no_grad():
        new = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[0, prompt:].tolist()
    ended = next((i for i, token in enumerate(new) if token in eos), None)
    return processor.tokenizer.decode(new[:ended], skip_special_tokens=True), prompt, \
        len(new) if ended is None else ended + 1


def answer(output) -> tuple[str, int, int]:
    return output.text, output.prompt_tokens, output.completion_tokens


def test_frames_cross_the_data_uri_bit_exactly_in_any_layout():
    frames = noise_frames()
    uri = frames_data_uri(frames)
    assert uri.startswith(f"data:{FRAMES_MEDIA_TYPE};base64,")
    np.testing.assert_array_equal(load_video(uri), frames)
    np.testing.assert_array_equal(load_video(frames_data_uri(torch.from_numpy(frames).permute(0, 3, 1, 2))), frames)
    np.testing.assert_array_equal(load_video(frames_data_uri([Image.fromarray(f) for f in frames])), frames)
    np.testing.assert_array_equal(load_video(frames_data_uri(list(frames))), frames)
    buffer = io.BytesIO()  # a client's own .npy may be Fortran-ordered
    np.save(buffer, np.asfortranarray(frames))
    fortran = f"data:{FRAMES_MEDIA_TYPE};base64," + base64.b64encode(buffer.getvalue()).decode()
    np.testing.assert_array_equal(load_video(fortran), frames)
    np.testing.assert_array_equal(load_video(uri, 4), frames[[0, 1, 3, 4]])  # sampled as a file's frames are


def test_generate_with_frames_gives_transformers_answer_for_every_frame_form(llm, reference, llava_onevision_dir):
    frames = noise_frames()
    eos = set(engine_for(llava_onevision_dir).model.generation_config.eos_token_ids)
    expected = reference_answer(reference, eos, PROMPT, frames)  # all 6 frames: transformers samples none
    forms = [frames, torch.from_numpy(frames), torch.from_numpy(frames).permute(0, 3, 1, 2),
             [Image.fromarray(f) for f in frames], list(frames), [frames]]
    outputs = llm.generate([{"prompt": PROMPT, "multi_modal_data": {"video": form}} for form in forms], GREEDY,
                           use_tqdm=False)
    assert [answer(output) for output in outputs] == [expected] * len(forms)

    sampled = reference_answer(reference, eos, PROMPT, frames, do_sample_frames=True, num_frames=4)
    output, = llm.generate({"prompt": PROMPT, "multi_modal_data": {"video": {"url": frames, "num_frames": 4}}},
                           GREEDY, use_tqdm=False)
    assert answer(output) == sampled and sampled[1] < expected[1]  # 4 frames' tokens, not 6


def test_chat_with_a_video_part_of_frames_gives_transformers_answer(llm, reference, llava_onevision_dir):
    frames = noise_frames(seed=1)
    question = "Describe the video."
    processor, _ = reference
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "video"},
                                                                       {"type": "text", "text": question}]}],
                                         add_generation_prompt=True)
    eos = set(engine_for(llava_onevision_dir).model.generation_config.eos_token_ids)
    expected = reference_answer(reference, eos, text, frames)
    sampled = reference_answer(reference, eos, text, frames, do_sample_frames=True, num_frames=4)
    every, four = llm.chat([[{"role": "user", "content": [{"type": "video", "video": frames}, question]}],
                            [{"role": "user", "content": [{"type": "video", "video": frames, "num_frames": 4},
                                                          question]}]], GREEDY, use_tqdm=False)
    assert (answer(every), answer(four)) == (expected, sampled)


def test_an_http_client_sends_frames_as_an_npy_data_uri(llava_onevision_dir, reference):
    frames = noise_frames(seed=2)
    eos = set(engine_for(llava_onevision_dir).model.generation_config.eos_token_ids)
    expected = reference_answer(reference, eos, PROMPT, frames, do_sample_frames=True, num_frames=3)
    video = {"url": frames_data_uri(frames), "num_frames": 3}
    with serve(llava_onevision_dir) as server:
        response = httpx.post(server.url + "/v1/completions", timeout=120, json={
            "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0, "multi_modal_data": {"video": [video]}})
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["choices"][0]["text"], body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]) == \
            expected


def _npy_uri(array: np.ndarray, cut: int = 0) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=array.dtype == object)
    data = buffer.getvalue()
    return f"data:{FRAMES_MEDIA_TYPE};base64," + base64.b64encode(data[:len(data) - cut]).decode()


def test_bad_frames_over_http_are_400s_naming_the_problem(llava_onevision_dir):
    frames = noise_frames(count=3, height=8, width=8)
    cases = [
        (_npy_uri(frames.astype(np.float32)), ["multi_modal_data.video[0]", "uint8", "float32"]),
        (_npy_uri(frames[0]), ["uint8", "(8, 8, 3)", "one frame"]),
        (_npy_uri(np.array([frames], dtype=object)), ["uint8", "object"]),  # never unpickled
        (_npy_uri(frames, cut=5), ["truncated"]),
        (_npy_uri(frames[:0]), ["zero frames"]),
        (_npy_uri(frames[:, :0]), ["8x0 pixels"]),
        (_npy_uri(noise_frames(count=5, height=8, width=8)), ["5 frames", "--max-video-frames"]),
        (_npy_uri(noise_frames(count=2, height=40, width=40)), ["40x40", "--max-image-pixels"]),
        (f"data:{FRAMES_MEDIA_TYPE};base64," + base64.b64encode(b"not numpy").decode(), ["not a .npy array"]),
        ("data:text/plain;base64,aGVsbG8=", ["not a video", "'text/plain'", FRAMES_MEDIA_TYPE]),
    ]
    with serve(llava_onevision_dir, limits={"max_video_frames": 4, "max_image_pixels": 1000}) as server:
        for url, names in cases:
            response = httpx.post(server.url + "/v1/completions", timeout=60, json={
                "prompt": PROMPT, "max_tokens": 2, "multi_modal_data": {"video": [url]}})
            assert response.status_code == 400, (names, response.text)
            message = response.json()["error"]["message"]
            assert all(name in message for name in names), (names, message)


def test_bad_frames_in_llm_are_input_errors_naming_the_problem(llava_onevision_dir):
    limits = ServeLimits(max_video_frames=4)
    llm = LLM.from_engine(engine_for(llava_onevision_dir), ServeConfig(model=str(llava_onevision_dir), limits=limits))
    frames = noise_frames(count=3, height=8, width=8)
    cases = [
        (frames.astype(np.float32), ["multi_modal_data['video'][0]", "uint8", "float32"]),
        (torch.zeros(2, 8, 8, 3), ["uint8", "float32"]),
        (frames[0][None, ..., 0], ["uint8", "(1, 8, 8)"]),
        (frames[:0], ["zero frames"]),
        (noise_frames(count=5, height=8, width=8), ["5 frames", "--max-video-frames"]),
        ([Image.new("RGB", (8, 8)), Image.new("RGB", (9, 8))], ["differ in size"]),
        ([frames[0], "frame.png"], ["multi_modal_data['video'][0]"]),  # a list of videos: the first is frames
        (b"raw bytes", ["bytes", "uint8 numpy array or tensor"]),
        ({"url": frames, "num_frames": 5}, ["5 frames", "--max-video-frames"]),
        ({"url": frames, "num_frames": 4}, ["4 frames requested", "only 3"]),
    ]
    try:
        for video, names in cases:
            with pytest.raises(InputError) as caught:
                llm.generate({"prompt": PROMPT, "multi_modal_data": {"video": video}}, use_tqdm=False)
            assert all(name in str(caught.value) for name in names), (names, str(caught.value))
        with pytest.raises(InputError, match="content part 0: video frames must be uint8"):
            llm.chat([{"role": "user", "content": [{"type": "video", "video": frames > 0}, "Hi"]}], use_tqdm=False)
    finally:
        llm.close()


def test_a_header_claiming_more_frames_than_the_payload_holds_is_refused_before_allocating():
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (10 ** 6, 10 ** 4, 10 ** 4, 3)})  # 3e14 bytes
    buffer.write(bytes(12))
    with pytest.raises(MediaError, match=r"header says 300000000000000 bytes of frames .* but 12 follow it"):
        load_video(f"data:{FRAMES_MEDIA_TYPE};base64," + base64.b64encode(buffer.getvalue()).decode())


def test_what_the_cli_check_learned_of_a_file_spares_the_decode_a_second_read(tmp_path, monkeypatch):
    """``vlmkit chat --video`` checks the file before the model loads; decoding it later reuses the frame count
    (for MKV a pass over every packet) instead of reading the container again, unless the file changed."""
    from fixtures_llava import write_video

    from vlmkit.io import video

    clip = write_video(tmp_path / "clip.mkv", num_frames=12)  # Matroska stores no frame count
    expected = load_video(clip, 4)
    assert video.check_video_file(clip, 4) == 12

    def read_again(*args):
        raise AssertionError("the container was read again")

    monkeypatch.setattr(video, "_probe", read_again)
    np.testing.assert_array_equal(load_video(clip, 4), expected)
    clip.write_bytes(write_video(tmp_path / "other.mkv", num_frames=8).read_bytes())  # changed: read afresh
    with pytest.raises(AssertionError, match="read again"):
        load_video(clip, 4)


def test_the_processor_takes_every_frame_held_in_memory_as_transformers(reference, llava_onevision_dir):
    """More frames than load_video's file limit (64): transformers' processor takes them all, and so does vlmkit's
    (the server's --max-video-frames is checked where it loads them)."""
    import vlmkit

    ref_processor, _ = reference
    frames = noise_frames(count=70, height=24, width=24)
    expected = ref_processor(text=PROMPT, videos=[frames], return_tensors="pt")
    got = vlmkit.AutoProcessor.from_pretrained(llava_onevision_dir)(text=PROMPT, videos=[frames], return_tensors="pt")
    assert got["pixel_values_videos"].shape[1] == 70
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["pixel_values_videos"], expected["pixel_values_videos"])
