"""The seed docs' examples, run as written with only the import changed (``from transformers import`` ->
``from vlmkit import``), against transformers 5.23 running the same lines: Hub ids become tiny local
folders in the Hub repos' layouts, image URLs a local HTTP server's, and each side starts from the same
torch seed, so sampled tokens must agree too.

Half-precision runs compare with vlmkit's compiled CPU kernels off: those kernels (prefill and decode
attention, the one-call decoder step) round bf16 differently from torch's ops by design, so only torch's
own path can be bit-exact with transformers. Where transformers 5.23 cannot run an example itself, the
test says so and gives the reference the smallest change that lets it run."""

from __future__ import annotations

import functools
import http.server
import re
import threading

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_torch_thread")

JANUS_ID, ONEVISION_ID, IDEFICS_ID = "deepseek-community/Janus-Pro-1B", "llava-hf/llava-onevision-qwen2-7b-ov-hf", \
    "HuggingFaceM4/idefics-9b"


@pytest.fixture(scope="module")
def folders(janus_dir, llava_onevision_dir, idefics_resampler_dir, tmp_path_factory) -> dict:
    from builders.real_layouts import write_idefics_hub_layout, write_janus_community_layout, write_onevision_hub_layout

    root = tmp_path_factory.mktemp("doc_examples")
    return {JANUS_ID: write_janus_community_layout(janus_dir, root / "janus", template_file="chat_template.json"),
            ONEVISION_ID: write_onevision_hub_layout(llava_onevision_dir, root / "onevision", shards=2),
            IDEFICS_ID: write_idefics_hub_layout(idefics_resampler_dir, root / "idefics")}


@pytest.fixture(scope="module")
def image_server(tmp_path_factory):
    """A loopback HTTP server with five small JPEGs, /0.jpg ... /4.jpg."""
    folder = tmp_path_factory.mktemp("doc_images")
    for index, (width, height) in enumerate([(64, 48), (50, 70), (40, 40), (70, 50), (33, 45)]):
        pixels = np.random.default_rng(index).integers(0, 256, (height, width, 3)).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.jpg")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def torch_kernels_only(monkeypatch):
    from vlmkit.nn.cpu_features import kernel_isa

    monkeypatch.setenv("VLMKIT_CPU_KERNELS", "off")
    kernel_isa.cache_clear()
    yield
    monkeypatch.undo()
    kernel_isa.cache_clear()


@pytest.fixture
def reference_processors(monkeypatch):
    """transformers' processors as the tests compare with: the PIL backend (the default one needs
    torchvision), and OneVision's put together by the builder (its video processor needs torchvision)."""
    import transformers
    from builders.llava_onevision import reference_processor

    auto = transformers.AutoProcessor.from_pretrained.__func__
    janus = transformers.JanusProcessor.from_pretrained.__func__

    def auto_processor(cls, path, **kwargs):
        if (path.rstrip("/") + "/").endswith("/onevision/"):
            return reference_processor(path)
        return auto(cls, path, **{"backend": "pil", **kwargs})

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", classmethod(auto_processor))
    monkeypatch.setattr(transformers.LlavaOnevisionProcessor, "from_pretrained",
                        classmethod(lambda cls, path, **kwargs: reference_processor(path)))
    monkeypatch.setattr(transformers.JanusProcessor, "from_pretrained",
                        classmethod(lambda cls, path, **kwargs: janus(cls, path, **{"backend": "pil", **kwargs})))


def run(example: str, library: str, folders: dict, server: str, **replace) -> dict:
    """Run a doc example with ``library``'s classes; its namespace afterwards."""
    code = example
    for hub_id, folder in folders.items():
        code = code.replace(f'"{hub_id}"', repr(str(folder)))
    urls = list(dict.fromkeys(re.findall(r'https?://[^"\']+', code)))
    for index, url in enumerate(urls):
        code = code.replace(url, f"{server}/{index}.jpg")
    for old, new in replace.items():
        code = code.replace(old, new)
    if library == "vlmkit":
        code = code.replace("from transformers import", "from vlmkit import")
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(code, f"<{library} doc example>", "exec"), namespace)
    return namespace


def both(example, folders, server, **replace):
    return run(example, "transformers", folders, server, **replace), run(example, "vlmkit", folders, server, **replace)


# --- 000/001: Janus -----------------------------------------------------------------------------------------

JANUS_SINGLE = '''
import torch
from transformers import JanusForConditionalGeneration, JanusProcessor

model_id = "deepseek-community/Janus-Pro-1B"
messages = [
    {
        "role": "user",
        "content": [
            {'type':'image', 'url': 'http://images.cocodataset.org/val2017/000000039769.jpg'},
            {'type':"text", "text":"What do you see in this image?."}
        ]
    },
]
processor = JanusProcessor.from_pretrained(model_id)
model = JanusForConditionalGeneration.from_pretrained(model_id,
        torch_dtype=torch.bfloat16,
        device_map="auto")

inputs = processor.apply_chat_template(
    messages,
    add_generation_prompt=True,
    generation_mode="text",
    tokenize=True,
    return_dict=True,
    return_tensors="pt",
).to(model.device, dtype=torch.bfloat16)

output = model.generate(**inputs, max_new_tokens=40,generation_mode='text',do_sample=True)
text = processor.decode(output[0], skip_special_tokens=True)
'''


@pytest.mark.usefixtures("torch_kernels_only", "reference_processors")
@pytest.mark.parametrize("dtype_option", ["torch_dtype", "dtype"])  # 001 (Markdown) and 000 (rendered) spell it so
def test_janus_single_image_example_samples_transformers_tokens(folders, image_server, dtype_option):
    reference, ours = both(JANUS_SINGLE, folders, image_server, torch_dtype=dtype_option)
    assert ours["model"].dtype == torch.bfloat16
    assert ours["output"].tolist() == reference["output"].tolist()
    assert ours["text"] == reference["text"]


JANUS_BATCH = '''
import torch
from transformers import JanusForConditionalGeneration, JanusProcessor

model_id = "deepseek-community/Janus-Pro-1B"
image_urls = [
    "http://images.cocodataset.org/val2017/000000039769.jpg",
    "https://www.ilankelman.org/stopsigns/australia.jpg",
    "https://huggingface.co/microsoft/kosmos-2-patch14-224/resolve/main/snowman.jpg"
]
messages = [
    [{"role": "user", "content": [{"type": "text", "text": "What’s the difference between"},
                                  {"type": "image", "url": image_urls[0]},
                                  {"type": "text", "text": " and "},
                                  {"type": "image", "url": image_urls[1]}]}],
    [{"role": "user", "content": [{"type": "image", "url": image_urls[2]},
                                  {"type": "text", "text": "What do you see in this image?"}]}]
]
processor = JanusProcessor.from_pretrained(model_id)
model = JanusForConditionalGeneration.from_pretrained(
    model_id, torch_dtype=torch.bfloat16, device_map="auto"
)
inputs = processor.apply_chat_template(
    messages,
    add_generation_prompt=True,
    generation_mode="text",
    tokenize=True,
    padding=True,
    return_dict=True,
    return_tensors="pt"
).to(model.device, dtype=torch.bfloat16)
output = model.generate(**inputs, max_new_tokens=40, generation_mode='text', do_sample=False)
text = processor.batch_decode(output, skip_special_tokens=True)
'''


@pytest.mark.usefixtures("torch_kernels_only", "reference_processors")
def test_janus_multi_image_batch_example_matches_transformers(folders, image_server):
    reference, ours = both(JANUS_BATCH, folders, image_server)
    for key, value in reference["inputs"].items():
        assert torch.equal(ours["inputs"][key], value), key
    assert ours["output"].tolist() == reference["output"].tolist()
    assert ours["text"] == reference["text"]


JANUS_TEXT_TO_IMAGE = '''
import torch
from transformers import JanusForConditionalGeneration, JanusProcessor

model_id = "deepseek-community/Janus-Pro-1B"
processor = JanusProcessor.from_pretrained(model_id)
model = JanusForConditionalGeneration.from_pretrained(model_id,
        torch_dtype=torch.bfloat16,
        device_map="auto")
messages = [{"role": "user", "content": [{"type": "text", "text": "A dog running under the rain."}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=prompt,generation_mode="image",return_tensors="pt").to(model.device, dtype=torch.bfloat16)

model.generation_config.num_return_sequences = 2
outputs = model.generate(**inputs,
                         generation_mode="image",
                         do_sample=True,
                         use_cache=True,
                         )
decoded_image = model.decode_image_tokens(outputs)
images = processor.postprocess(list(decoded_image.float()),return_tensors="PIL.Image.Image")
'''


@pytest.mark.usefixtures("torch_kernels_only", "reference_processors")
def test_janus_text_to_image_example_gives_transformers_tokens_pixels_and_images(janus_dir, image_server):
    # transformers 5.23 cannot run this example as written: it refuses num_return_sequences=2 set on the
    # generation config ("greedy methods", though do_sample=True is passed), on the community layout it has
    # lost generation_kwargs (boi_token_id), and its postprocess fails on the channels-last pixels
    # decode_image_tokens returns. Its reference here: the transformers-5 folder, do_sample also set on the
    # generation config, and the pixels handed to postprocess channels-first
    folders = {JANUS_ID: janus_dir}
    reference = run(JANUS_TEXT_TO_IMAGE.split("images = processor")[0], "transformers", folders, image_server,
                    **{"model.generation_config.num_return_sequences = 2":
                       "model.generation_config.num_return_sequences = 2; model.generation_config.do_sample = True"})
    ours = run(JANUS_TEXT_TO_IMAGE, "vlmkit", folders, image_server)
    assert ours["outputs"].shape[0] == 2
    assert ours["outputs"].tolist() == reference["outputs"].tolist()
    assert ours["decoded_image"].dtype == reference["decoded_image"].dtype == torch.bfloat16
    assert torch.equal(ours["decoded_image"], reference["decoded_image"])  # VQ decoder rounds as transformers'
    expected = reference["processor"].postprocess(list(reference["decoded_image"].float().permute(0, 3, 1, 2)),
                                                  return_tensors="PIL.Image.Image")["pixel_values"]
    assert [np.asarray(i).tolist() for i in ours["images"]["pixel_values"]] == \
        [np.asarray(i).tolist() for i in expected]


JANUS_FORWARD_DOCSTRING = '''
from transformers import AutoProcessor, JanusForConditionalGeneration

model = JanusForConditionalGeneration.from_pretrained("deepseek-community/Janus-Pro-1B")
processor = AutoProcessor.from_pretrained("deepseek-community/Janus-Pro-1B")
messages = [{"role": "user", "content": [
    {"type": "image", "url": "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/pipeline-cat-chonk.jpeg"},
    {"type": "text", "text": "Where is the cat standing?"}]}]
inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt",
                                       add_generation_prompt=True)
generate_ids = model.generate(**inputs)
answer = processor.batch_decode(generate_ids, skip_special_tokens=True)[0]
'''


@pytest.mark.usefixtures("reference_processors")
def test_janus_forward_docstring_example_generates_transformers_default_twenty_tokens(folders, image_server):
    # transformers 5.23's Janus generate hands a prepared generation config on, so the prompt (longer than the
    # default max_length 20) raises there; its other models generate 20 new tokens, which vlmkit does
    reference = run(JANUS_FORWARD_DOCSTRING, "transformers", folders, image_server,
                    **{"model.generate(**inputs)": "model.generate(**inputs, max_new_tokens=20)"})
    ours = run(JANUS_FORWARD_DOCSTRING, "vlmkit", folders, image_server)
    assert ours["generate_ids"].tolist() == reference["generate_ids"].tolist()
    assert ours["answer"] == reference["answer"]


# --- 003: LLaVA-OneVision -----------------------------------------------------------------------------------

ONEVISION_BATCH = '''
import torch
from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

model = LlavaOnevisionForConditionalGeneration.from_pretrained("llava-hf/llava-onevision-qwen2-7b-ov-hf", dtype=torch.float16, device_map="auto")
processor = AutoProcessor.from_pretrained("llava-hf/llava-onevision-qwen2-7b-ov-hf")
conversation_1 = [
    {"role": "user", "content": [{"type": "image", "url": "https://www.ilankelman.org/stopsigns/australia.jpg"},
                                 {"type": "text", "text": "What is shown in this image?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "There is a red stop sign in the image."}]},
    {"role": "user", "content": [{"type": "image", "url": "http://images.cocodataset.org/val2017/000000039769.jpg"},
                                 {"type": "text", "text": "What about this image? How many cats do you see?"}]},
]
conversation_2 = [
    {"role": "user", "content": [
        {"type": "image", "url": "https://huggingface.co/microsoft/kosmos-2-patch14-224/resolve/main/snowman.jpg"},
        {"type": "text", "text": "What is shown in this image?"}]},
]
inputs = processor.apply_chat_template(
    [conversation_1, conversation_2],
    add_generation_prompt=True,
    tokenize=True,
    return_dict=True,
    padding=True,
    padding_side="left",
    return_tensors="pt",
).to(model.device, torch.float16)
generate_ids = model.generate(**inputs, max_new_tokens=30)
answers = processor.batch_decode(generate_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
'''


@pytest.mark.usefixtures("torch_kernels_only", "reference_processors")
def test_onevision_batched_multi_image_example_in_float16_matches_transformers(folders, image_server):
    reference, ours = both(ONEVISION_BATCH, folders, image_server)
    for key, value in reference["inputs"].items():
        assert torch.equal(torch.as_tensor(ours["inputs"][key]), torch.as_tensor(value)), key
    with torch.no_grad():  # the tower's features reach the projector in the layout the reference's do
        expected = reference["model"](**reference["inputs"]).logits
        assert torch.equal(ours["model"](**ours["inputs"]).logits, expected)
    assert ours["generate_ids"].tolist() == reference["generate_ids"].tolist()
    assert ours["answers"] == reference["answers"]


ONEVISION_TEMPLATE = '''
from transformers import AutoProcessor

processor = AutoProcessor.from_pretrained("llava-hf/llava-onevision-qwen2-7b-si-hf")
conversation = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What’s shown in this image?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "This image shows a red stop sign."},]},
    {"role": "user", "content": [{"type": "text", "text": "Describe the image in more details."}]},
]
text_prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
'''


@pytest.mark.usefixtures("reference_processors")
def test_onevision_chat_template_example_renders_transformers_prompt(folders, image_server):
    folders = {**folders, "llava-hf/llava-onevision-qwen2-7b-si-hf": folders[ONEVISION_ID]}
    reference, ours = both(ONEVISION_TEMPLATE, folders, image_server)
    assert ours["text_prompt"] == reference["text_prompt"]


# --- 004: IDEFICS -------------------------------------------------------------------------------------------

IDEFICS_FORWARD_DOCSTRING = '''
from transformers import AutoProcessor, IdeficsForVisionText2Text

model = IdeficsForVisionText2Text.from_pretrained("HuggingFaceM4/idefics-9b")
processor = AutoProcessor.from_pretrained("HuggingFaceM4/idefics-9b")
dogs_image_url_1 = "https://huggingface.co/datasets/hf-internal-testing/fixtures_nlvr2/raw/main/image1.jpeg"
dogs_image_url_2 = "https://huggingface.co/datasets/hf-internal-testing/fixtures_nlvr2/raw/main/image2.jpeg"
prompts = [
    [
        "User:",
        dogs_image_url_1,
        "Describe this image.\\nAssistant: An image of two dogs.\\n",
        "User:",
        dogs_image_url_2,
        "Describe this image.\\nAssistant:",
    ]
]
inputs = processor(prompts, return_tensors="pt")
generate_ids = model.generate(**inputs, max_new_tokens=6)
answers = processor.batch_decode(generate_ids, skip_special_tokens=True)
'''


@pytest.mark.usefixtures("reference_processors")
def test_idefics_forward_docstring_example_matches_transformers(folders, image_server):
    # transformers 5.23 raises UnboundLocalError on the prompts passed positionally; its reference names them
    reference = run(IDEFICS_FORWARD_DOCSTRING, "transformers", folders, image_server,
                    **{"processor(prompts,": "processor(text=prompts,"})
    ours = run(IDEFICS_FORWARD_DOCSTRING, "vlmkit", folders, image_server)
    for key, value in reference["inputs"].items():
        assert torch.equal(ours["inputs"][key], value), key
    assert ours["generate_ids"].tolist() == reference["generate_ids"].tolist()
    assert ours["answers"] == reference["answers"]


# --- 002: DeepSeek's VLChatProcessor ------------------------------------------------------------------------

def test_deepseek_vlchat_processor_example_gives_the_chat_templates_ids(janus_original_dir, sample_images):
    # DeepSeek's `janus` package is not installed: the reference is the same prompt through transformers'
    # JanusProcessor chat template on the same weights in the community layout (tests/test_janus_original_layout.py
    # pins the weights), and the docs' shapes
    from vlmkit import JanusProcessor

    vl_chat_processor = JanusProcessor.from_pretrained(janus_original_dir)
    conversation = [
        {"role": "<|User|>", "content": "<image_placeholder>\nDescribe this image.", "images": ["./examples/image.png"]},
        {"role": "<|Assistant|>", "content": ""},
    ]
    pil_images = [sample_images["square"]]
    prepare_inputs = vl_chat_processor(conversations=conversation, images=pil_images, force_batchify=True).to("cpu")
    side = vl_chat_processor.image_processor.size["height"] if isinstance(
        vl_chat_processor.image_processor.size, dict) else 32
    assert prepare_inputs["pixel_values"].shape == (1, 1, 3, side, side)
    assert prepare_inputs["input_ids"].shape == prepare_inputs["images_seq_mask"].shape
    assert prepare_inputs["images_emb_mask"].shape[:2] == (1, 1)
    assert int(prepare_inputs["images_seq_mask"].sum()) == int(prepare_inputs["images_emb_mask"].sum())
