"""generate's decoding options against transformers on the three families' tiny checkpoints (fp32):
each option of the logits pipeline, the user's logits processors and stopping criteria, scores and
logits in the returned dict, and beam search give the same token ids (scores within 1e-4); options
vlmkit cannot honour are errors naming them."""

from types import SimpleNamespace

import pytest
import torch

from vlmkit.errors import InputError

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()

NEW_TOKENS = 6
FAMILIES = ["janus", "llava_onevision", "idefics"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread (conftest.py)


def _janus(request, images):
    from janus_reference import chat_inputs, ours, reference

    path = str(request.getfixturevalue("janus_dir"))
    (ref_processor, ref_model), (processor, model) = reference(path), ours(path)
    conversations = [[{"role": "user", "content": [{"type": "image", "image": image},
                                                   {"type": "text", "text": question}]}]
                     for image, question in [(images["square"], "What do you see in this image, in detail?"),
                                             (images["wide"], "Describe it.")]]
    return SimpleNamespace(ref_model=ref_model, model=model, ref_inputs=chat_inputs(ref_processor, conversations,
                                                                                    padding=True),
                           inputs=chat_inputs(processor, conversations, padding=True),
                           mode={"generation_mode": "text"})


def _llava_onevision(request, images):
    (ref_processor, ref_model) = request.getfixturevalue("onevision_reference")
    (processor, model) = request.getfixturevalue("onevision_vlmkit")
    conversations = [[{"role": "user", "content": [{"type": "image", "image": image},
                                                   {"type": "text", "text": question}]}]
                     for image, question in [(images["tall"], "What is shown in this image? Be brief."),
                                             (images["square"], "And here?")]]
    options = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True,
                   padding_side="left")
    return SimpleNamespace(ref_model=ref_model, model=model,
                           ref_inputs=ref_processor.apply_chat_template(conversations, **options),
                           inputs=processor.apply_chat_template(conversations, **options), mode={})


def _idefics(request, images):
    from vlmkit.models.idefics import IdeficsForVisionText2Text, IdeficsProcessor

    path = str(request.getfixturevalue("idefics_resampler_dir"))
    ref_processor = transformers.AutoProcessor.from_pretrained(path, backend="pil")
    ref_model = transformers.IdeficsForVisionText2Text.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [["User:", images["square"], "What is in the image?\nAssistant:"],
               ["User:", images["wide"], "Describe it.\nAssistant:"]]
    processor = IdeficsProcessor.from_pretrained(path)
    return SimpleNamespace(ref_model=ref_model, model=IdeficsForVisionText2Text.from_pretrained(path, dtype=torch.float32),
                           ref_inputs=ref_processor(text=prompts), inputs=processor(text=prompts), mode={},
                           processor=processor)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, sample_images):
    """A padded batch of two image prompts for the reference and vlmkit, and vlmkit's plain greedy output."""
    case = {"janus": _janus, "llava_onevision": _llava_onevision, "idefics": _idefics}[request.param](
        request, sample_images)
    assert torch.equal(case.ref_inputs["input_ids"], case.inputs["input_ids"])
    assert not bool(case.inputs["attention_mask"][:, 0].all())  # left padding in the batch
    case.name = request.param
    case.prompt_length = case.inputs["input_ids"].shape[1]
    case.plain = case.model.generate(**case.inputs, **case.mode, max_new_tokens=NEW_TOKENS)
    case.first = case.plain[0, case.prompt_length:].tolist()  # the first row's greedy tokens
    return case


def generate_both(case, **options):
    """(reference output, vlmkit output) for the same options."""
    options = {"max_new_tokens": NEW_TOKENS, "do_sample": False, **case.mode, **options}
    return case.ref_model.generate(**case.ref_inputs, **options), case.model.generate(**case.inputs, **options)


def assert_same_steps(expected, got):
    for name in ("scores", "logits"):
        assert len(getattr(got, name)) == len(getattr(expected, name)), name
        for want, have in zip(getattr(expected, name), getattr(got, name)):
            assert want.shape == have.shape
            assert torch.allclose(have, want, atol=1e-4, rtol=0), name


# Options built from the first row's greedy tokens t (and the prompt length n), so that each one
# bites on whatever the random checkpoint generates. `changes`: the first row must differ from greedy.
OPTION_CASES = {
    "repetition_penalty": (lambda t, n: dict(repetition_penalty=1.6), False),
    "no_repeat_ngram_size": (lambda t, n: dict(no_repeat_ngram_size=2), False),
    "min_new_tokens": (lambda t, n: dict(eos_token_id=t[1], min_new_tokens=4), False),
    "min_length": (lambda t, n: dict(eos_token_id=t[1], min_length=n + 3), False),
    "bad_words_ids one token": (lambda t, n: dict(bad_words_ids=[[t[1]]]), True),
    "bad_words_ids sequences": (lambda t, n: dict(bad_words_ids=[[t[0], t[1]], [t[2], t[3], t[4]]]), True),
    "suppress_tokens": (lambda t, n: dict(suppress_tokens=[t[0], t[2]]), True),
    "begin_suppress_tokens": (lambda t, n: dict(begin_suppress_tokens=[t[0]]), True),
    "sequence_bias": (lambda t, n: dict(sequence_bias=[[[t[0]], -4.0], [[t[0], t[1]], -2.5], [[t[3]], 1.5]]), False),
    "renormalize_logits": (lambda t, n: dict(renormalize_logits=True, repetition_penalty=1.2), False),
    "prefix_allowed_tokens_fn": (lambda t, n: dict(prefix_allowed_tokens_fn=lambda batch_id, ids: t[:4] if batch_id == 0
                                                   else t[2:]), False),
    "forced_eos_token_id": (lambda t, n: dict(forced_eos_token_id=t[0]), False),
    "exponential_decay_length_penalty": (lambda t, n: dict(eos_token_id=t[4], exponential_decay_length_penalty=(1, 3.0)),
                                         False),
    "remove_invalid_values": (lambda t, n: dict(remove_invalid_values=True, suppress_tokens=[t[0]]), True),
    "bad_words_ids only the end token": (lambda t, n: dict(eos_token_id=t[1], bad_words_ids=[[t[1]]]), False),
    "pad_token_id None": (lambda t, n: dict(eos_token_id=t[1], pad_token_id=None), False),
    "encoder_repetition_penalty": (lambda t, n: dict(encoder_repetition_penalty=3.0), False),
    "encoder_repetition_penalty below 1": (lambda t, n: dict(encoder_repetition_penalty=0.3), False),
    "encoder_no_repeat_ngram_size": (lambda t, n: dict(encoder_no_repeat_ngram_size=2), False),
    "encoder_no_repeat_ngram_size 1": (lambda t, n: dict(encoder_no_repeat_ngram_size=1), False),
    "watermarking_config": (lambda t, n: dict(watermarking_config=transformers.WatermarkingConfig(bias=6.0)), True),
    "watermarking_config selfhash": (lambda t, n: dict(watermarking_config=dict(
        seeding_scheme="selfhash", context_width=2, greenlist_ratio=0.5, bias=4.0)), False),
    "everything at once": (lambda t, n: dict(repetition_penalty=1.3, no_repeat_ngram_size=3, bad_words_ids=[[t[1]]],
                                             suppress_tokens=[t[2]], begin_suppress_tokens=[t[3]],
                                             sequence_bias={(t[0],): -1.0}, eos_token_id=t[4], min_new_tokens=3,
                                             renormalize_logits=True), True),
}


@pytest.mark.parametrize("option", list(OPTION_CASES))
def test_logits_option_matches_reference(family, option):
    make, changes = OPTION_CASES[option]
    options = make(family.first, family.prompt_length)
    expected, got = generate_both(family, **options, return_dict_in_generate=True, output_scores=True,
                                  output_logits=True)
    assert got.sequences.tolist() == expected.sequences.tolist()
    assert_same_steps(expected, got)
    if changes:
        assert got.sequences[0].tolist() != family.plain[0].tolist()


@pytest.mark.parametrize("warpers", [dict(temperature=0.7, top_k=8, top_p=0.9), dict(min_p=0.05, top_k=0),
                                     dict(top_k=None, temperature=None, top_p=None), dict(top_p=0.0, top_k=0),
                                     dict(typical_p=0.8, temperature=1.3), dict(epsilon_cutoff=0.002, top_k=0),
                                     dict(eta_cutoff=0.002, top_k=0), dict(top_h=0.4, top_k=0),
                                     dict(top_h=0.9, temperature=1.5, top_k=5)],
                         ids=["top-k top-p", "min-p", "None", "top-p 0", "typical", "epsilon", "eta", "top-h",
                              "top-h top-k"])
def test_sampling_through_the_pipeline_draws_what_the_reference_draws(family, warpers):
    # same global seed, same draws: the warpers run after the bans, as in the reference
    options = dict(do_sample=True, repetition_penalty=1.3, no_repeat_ngram_size=2, bad_words_ids=[[family.first[0]]],
                   **warpers)
    torch.manual_seed(7)
    expected = family.ref_model.generate(**family.ref_inputs, **family.mode, max_new_tokens=NEW_TOKENS, **options)
    torch.manual_seed(7)
    got = family.model.generate(**family.inputs, **family.mode, max_new_tokens=NEW_TOKENS, **options)
    assert got.tolist() == expected.tolist()


def test_idefics_model_card_bans_image_tokens_and_stops_at_end_of_utterance(family):
    if family.name != "idefics":
        pytest.skip("the IDEFICS model card's call")
    tokenizer = family.processor.tokenizer
    # as the model card writes it: the tokenizer's output read by attribute
    exit_condition = tokenizer("<end_of_utterance>", add_special_tokens=False).input_ids
    bad_words_ids = tokenizer(["<image>", "<fake_token_around_image>"], add_special_tokens=False).input_ids
    bad_words_ids.append([family.first[0], family.first[1]])  # and a two-token sequence the model would write
    expected, got = generate_both(family, eos_token_id=exit_condition, bad_words_ids=bad_words_ids)
    assert got.tolist() == expected.tolist()
    assert got[0].tolist() != family.plain[0].tolist()


@pytest.mark.parametrize("vocab", [50, 1000], ids=["fewer than its 100 candidates", "more"])
def test_top_h_keeps_the_tokens_transformers_keeps(vocab):
    from transformers.generation.logits_process import TopHLogitsWarper

    from vlmkit.generation.warpers import TopH

    scores = torch.randn(4, vocab, generator=torch.Generator().manual_seed(vocab)) * 3
    for top_h in (0.05, 0.4, 0.9, 1.0):
        want = TopHLogitsWarper(top_h)(None, scores)
        got = TopH(top_h)(None, scores)
        assert torch.equal(got.isinf(), want.isinf()) and torch.equal(got[~got.isinf()], want[~want.isinf()])
        assert 1 <= int((~got.isinf()).sum(dim=-1).min()) and (top_h == 1.0 or bool(got.isinf().any()))


@pytest.mark.filterwarnings("ignore:Using the model-agnostic default")
def test_without_a_length_option_twenty_new_tokens_as_the_reference(family):
    got = family.model.generate(**family.inputs, **family.mode)
    assert got.shape[1] == family.prompt_length + 20
    if family.name != "janus":  # transformers 5.23's Janus refuses: it applies max_length=20 to the whole sequence
        expected = family.ref_model.generate(**family.ref_inputs, **family.mode)
        assert got.tolist() == expected.tolist()


def test_return_dict_has_the_references_fields_by_name_and_position(family):
    expected, got = generate_both(family, return_dict_in_generate=True, output_scores=True)
    assert set(got) == set(expected) - {"past_key_values"}
    assert got[0] is got.sequences and got["scores"] is got.scores and got.logits is None
    assert len(got.scores) == NEW_TOKENS and got.scores[0].shape == expected.scores[0].shape
    assert torch.equal(got.sequences, family.plain)
    assert torch.equal(family.model.generate(**family.inputs, **family.mode, max_new_tokens=NEW_TOKENS,
                                             output_scores=True), family.plain)  # a tensor without the dict


@pytest.mark.parametrize("options", [dict(), dict(num_beams=3, num_return_sequences=2)], ids=["greedy", "beams"])
def test_transition_scores_match_the_reference(family, options):
    expected, got = generate_both(family, eos_token_id=family.first[2], return_dict_in_generate=True,
                                  output_scores=True, **options)
    beams = got.get("beam_indices")
    have = family.model.compute_transition_scores(got.sequences, got.scores, beams)
    if beams is None:  # greedy: the score each row's token had at its step
        new_tokens = got.sequences[:, family.prompt_length:]
        assert torch.equal(have, torch.stack([s.gather(1, new_tokens[:, i:i + 1])[:, 0] for i, s in enumerate(got.scores)], 1))
    else:  # beams: transformers' own check, the length-penalised sum is the beam's score
        lengths = (beams >= 0).sum(dim=1)
        assert torch.allclose(have.sum(dim=1) / lengths, got.sequences_scores, atol=1e-4, rtol=0)
    # transformers indexes the scores with the config's vocab_size, narrower than IDEFICS' head (which adds
    # the additional vocabulary), so its numbers for any row but the first are someone else's tokens'
    if family.name != "idefics":
        for normalize in (False, True):
            want = family.ref_model.compute_transition_scores(expected.sequences, expected.scores,
                                                              expected.get("beam_indices"), normalize_logits=normalize)
            have = family.model.compute_transition_scores(got.sequences, got.scores, beams, normalize_logits=normalize)
            assert torch.allclose(have, want, atol=1e-4, rtol=0)


BEAM_CASES = {
    "three beams": dict(num_beams=3),
    "return two of four, early stopping": dict(num_beams=4, num_return_sequences=2, length_penalty=0.6,
                                               early_stopping=True),
    "never stop early": dict(num_beams=2, early_stopping="never", length_penalty=1.5),
    "with bans": dict(num_beams=3, num_return_sequences=3, no_repeat_ngram_size=2, repetition_penalty=1.3),
}


@pytest.mark.parametrize("beams", list(BEAM_CASES))
def test_beam_search_matches_reference(family, beams):
    # an early end-of-sequence token makes beams finish at different lengths
    options = dict(BEAM_CASES[beams], eos_token_id=family.first[2], return_dict_in_generate=True, output_scores=True,
                   output_logits=True)
    expected, got = generate_both(family, **options)
    assert got.sequences.tolist() == expected.sequences.tolist()
    assert got.beam_indices.tolist() == expected.beam_indices.tolist()
    assert torch.allclose(got.sequences_scores, expected.sequences_scores, atol=1e-4, rtol=0)
    assert_same_steps(expected, got)
    plain_expected, plain_got = generate_both(family, **BEAM_CASES[beams])
    assert plain_got.tolist() == plain_expected.tolist()


def test_a_transformers_streamer_gets_the_prompt_then_each_step_as_from_the_reference(family):
    from transformers.generation.streamers import BaseStreamer

    class Recorder(BaseStreamer):
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.ended = True

    expected, got = Recorder(), Recorder()
    first = {k: v[:1] for k, v in family.inputs.items()}  # transformers streams a batch of one only
    family.ref_model.generate(**first, **family.mode, max_new_tokens=NEW_TOKENS, streamer=expected)
    family.model.generate(**first, **family.mode, max_new_tokens=NEW_TOKENS, streamer=got)
    assert got.puts == expected.puts and got.ended and expected.ended
    assert got.puts[0] == family.inputs["input_ids"][:1].tolist() and len(got.puts) == 1 + NEW_TOKENS


@pytest.mark.parametrize("options", [dict(num_beams=3), dict(num_beams=2, num_return_sequences=2, top_k=20, temperature=0.8)])
def test_beam_sampling_draws_what_the_reference_draws(family, options):
    options = dict(options, do_sample=True, eos_token_id=family.first[2], return_dict_in_generate=True,
                   output_scores=True)
    torch.manual_seed(5)
    expected = family.ref_model.generate(**family.ref_inputs, **family.mode, max_new_tokens=NEW_TOKENS, **options)
    torch.manual_seed(5)
    got = family.model.generate(**family.inputs, **family.mode, max_new_tokens=NEW_TOKENS, **options)
    assert got.sequences.tolist() == expected.sequences.tolist()
    assert got.beam_indices.tolist() == expected.beam_indices.tolist()
    assert torch.allclose(got.sequences_scores, expected.sequences_scores, atol=1e-4, rtol=0)


class BanToken:
    """A user's logits processor: bans one token and counts its calls."""

    def __init__(self, token: int):
        self.token, self.calls = token, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        scores = scores.clone()
        scores[:, self.token] = -torch.inf
        return scores


def test_users_logits_processor_runs_after_the_built_in_ones(family):
    ours_ban, reference_ban = BanToken(family.first[1]), BanToken(family.first[1])
    options = dict(max_new_tokens=NEW_TOKENS, repetition_penalty=1.2, return_dict_in_generate=True, output_scores=True)
    # transformers 5.23's Janus drops logits_processor in text mode; suppressing the token there bans it
    # at the same point of the pipeline (after the repetition penalty), so the scores must still agree
    banned = dict(suppress_tokens=[family.first[1]]) if family.name == "janus" else dict(logits_processor=[reference_ban])
    expected = family.ref_model.generate(**family.ref_inputs, **family.mode, **options, **banned)
    got = family.model.generate(**family.inputs, **family.mode, logits_processor=[ours_ban], **options)
    assert ours_ban.calls == NEW_TOKENS
    assert reference_ban.calls == (0 if family.name == "janus" else NEW_TOKENS)
    assert got.sequences.tolist() == expected.sequences.tolist()
    assert family.first[1] not in got.sequences[:, family.prompt_length:].tolist()[0]
    assert all(torch.allclose(a, b, atol=1e-4, rtol=0) for a, b in zip(got.scores, expected.scores))


def test_a_transformers_processor_replaces_the_built_in_one_it_matches(family):
    if family.name == "janus":
        pytest.skip("transformers' Janus drops logits_processor in text mode")
    from transformers import NoRepeatNGramLogitsProcessor, SuppressTokensLogitsProcessor

    options = dict(no_repeat_ngram_size=1, suppress_tokens=[family.first[0]])
    custom = [NoRepeatNGramLogitsProcessor(3), SuppressTokensLogitsProcessor([family.first[1]])]
    expected, got = generate_both(family, logits_processor=custom, **options)
    assert got.tolist() == expected.tolist()


def test_stop_strings_stop_where_the_reference_stops(family):
    """A stop string inside the answer, one that begins in the prompt and ends in the first new token, one
    wholly inside the prompt (no stop), and a CJK one spelled by byte tokens (more tokens than characters)."""
    from vlmkit.io.tokenizer import Tokenizer

    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(family.ref_model.name_or_path)
    tokenizer = Tokenizer.from_pretrained(family.ref_model.name_or_path)
    prompt = family.inputs["input_ids"][0]
    prompt_text = tokenizer.decode(prompt[-3:])
    answer = tokenizer.decode(family.plain[0, family.prompt_length:])
    forced = tokenizer.encode("日本語のテキスト", add_special_tokens=False)

    def force(batch_id, ids):  # the CJK text, token by token
        return [forced[min(ids.shape[0] - family.prompt_length, len(forced) - 1)]]

    cases = [dict(stop_strings=[answer.strip()[1:3]]), dict(stop_strings=[prompt_text[-1] + answer[:1]]),
             dict(stop_strings=[prompt_text[-3:-1]]),
             dict(stop_strings=["日本語"], prefix_allowed_tokens_fn=force, max_new_tokens=12)]
    for options in cases:
        expected = family.ref_model.generate(**family.ref_inputs, **family.mode, **{"max_new_tokens": NEW_TOKENS,
                                             **options}, do_sample=False, tokenizer=reference_tokenizer)
        got = family.model.generate(**family.inputs, **family.mode, **{"max_new_tokens": NEW_TOKENS, **options},
                                    do_sample=False, tokenizer=tokenizer)
        assert got.tolist() == expected.tolist(), options


def test_stopping_criteria_stop_rows_as_the_reference(family):
    calls = []

    def after_three(input_ids, scores, **kwargs):
        calls.append(input_ids.shape[1])
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= family.prompt_length + 3)

    def on_token(input_ids, scores, **kwargs):  # stops the first row only (it is then padded)
        return input_ids[:, -1] == family.first[1]

    for criteria in ([after_three], [on_token]):
        expected, got = generate_both(family, stopping_criteria=criteria)
        assert got.tolist() == expected.tolist()
    assert calls[-3:] == [family.prompt_length + 1, family.prompt_length + 2, family.prompt_length + 3]
    assert got.shape[1] == family.prompt_length + NEW_TOKENS and got[0, -1] != family.plain[0, -1]
    expected, got = generate_both(family, num_beams=2, stopping_criteria=[after_three])
    assert got.tolist() == expected.tolist()
    expected, got = generate_both(family, max_time=0.0)  # time is up after the first token
    assert got.tolist() == expected.tolist() and got.shape[1] == family.prompt_length + 1
    # transformers' own length and end criteria take the place of the built-in ones
    from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, MaxTimeCriteria
    for options in (dict(max_new_tokens=1, stopping_criteria=[MaxLengthCriteria(family.prompt_length + 4)]),
                    dict(max_time=0.0, stopping_criteria=[MaxTimeCriteria(600.0)]),
                    dict(eos_token_id=family.first[1], stopping_criteria=[EosTokenCriteria(family.first[4])])):
        expected, got = generate_both(family, **options)
        assert got.tolist() == expected.tolist()
    assert got.shape[1] > family.prompt_length + 2  # ran past the config's end token


def test_transformers_generation_config_is_read(family):
    config = transformers.GenerationConfig(max_new_tokens=4, no_repeat_ngram_size=2, bad_words_ids=[[family.first[0]]])
    expected = family.ref_model.generate(**family.ref_inputs, **family.mode, generation_config=config)
    got = family.model.generate(**family.inputs, **family.mode, generation_config=config)
    assert got.tolist() == expected.tolist()


UNSUPPORTED = {
    "penalty_alpha": 0.6, "num_beam_groups": 2, "force_words_ids": [[3]], "diversity_penalty": 0.5,
    "dola_layers": "low",
}


def test_assisted_decoding_greedy_gives_the_references_tokens_and_sampling_through_it_is_an_error(family):
    """transformers' prompt lookup against vlmkit's plain greedy decoding, on a text prompt that repeats itself
    (transformers' assisted decoding takes one row, and fails on these families' image inputs)."""
    if family.name == "idefics":
        pytest.skip("transformers' assisted decoding fails on IDEFICS (an index past its additional vocabulary)")
    torch.manual_seed(0)
    words = torch.randint(10, 300, (1, 24))
    input_ids = torch.cat([words, words[:, :9], words[:, 4:12]], dim=1)
    options = dict(max_new_tokens=10, do_sample=False, prompt_lookup_num_tokens=3)
    expected = family.ref_model.generate(input_ids, **family.mode, **options)
    got = family.model.generate(input_ids, **family.mode, **options, max_matching_ngram_size=2)
    assert got.tolist() == expected.tolist()
    config = transformers.GenerationConfig(max_new_tokens=10, prompt_lookup_num_tokens=3)
    assert family.model.generate(input_ids, **family.mode, generation_config=config).tolist() == expected.tolist()
    for sampled in (dict(do_sample=True), dict(num_beams=2)):
        with pytest.raises(InputError, match="prompt_lookup_num_tokens .*greedy decoding only"):
            family.model.generate(input_ids, **family.mode, **options | sampled)


def test_transformers_watermark_detector_finds_the_mark_in_vlmkit_text(onevision_reference, onevision_vlmkit):
    _, ref_model = onevision_reference
    _, model = onevision_vlmkit
    watermark = transformers.WatermarkingConfig(bias=2.0)
    detector = transformers.WatermarkDetector(model_config=ref_model.config.get_text_config(), device="cpu",
                                              watermarking_config=watermark)
    prompt = torch.tensor([[3, 4, 5, 6]])
    torch.manual_seed(0)
    marked = model.generate(prompt, max_new_tokens=80, do_sample=True, watermarking_config=watermark)
    torch.manual_seed(0)
    plain = model.generate(prompt, max_new_tokens=80, do_sample=True)
    assert detector(marked, return_dict=True).prediction.tolist() == [True]
    assert detector(plain, return_dict=True).prediction.tolist() == [False]


@pytest.mark.parametrize("settings, message", [
    (dict(greenlist_ratio=1.0), "greenlist_ratio"), (dict(seeding_scheme="hash"), "seeding_scheme"),
    (dict(context_width=0), "context_width"), (dict(bias="2"), "bias"), (dict(greenlist=0.5), "unknown"),
    (transformers.SynthIDTextWatermarkingConfig(keys=[1, 2], ngram_len=2), "SynthID")])
def test_watermark_settings_it_cannot_use_are_errors_naming_them(onevision_vlmkit, settings, message):
    _, model = onevision_vlmkit
    with pytest.raises(InputError, match=message):
        model.generate(torch.tensor([[3, 4]]), max_new_tokens=1, watermarking_config=settings)


def test_a_watermark_set_in_the_generation_config_is_saved_and_read_back(tmp_path):
    from vlmkit.generation.config import GenerationConfig

    config = GenerationConfig()
    config.update(watermarking_config=transformers.WatermarkingConfig(bias=1.5, seeding_scheme="selfhash"))
    config.save_pretrained(tmp_path)
    read = GenerationConfig.from_pretrained(tmp_path).watermarking_config
    assert (read["bias"], read["seeding_scheme"], read["greenlist_ratio"]) == (1.5, "selfhash", 0.25)


def test_right_padding_is_warned_about_as_transformers_does(onevision_vlmkit):
    """The shared generate loop's check, shown on one family."""
    _, model = onevision_vlmkit
    input_ids = torch.tensor([[11, 12, 13], [14, 15, 0]])
    with pytest.warns(UserWarning, match="right-padding was detected"):
        model.generate(input_ids, attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]), max_new_tokens=1)


@pytest.mark.parametrize("negative", ["last prompt token", "negative prompt", "one negative prompt for all"])
@pytest.mark.parametrize("options", [dict(), dict(do_sample=True, top_k=20)], ids=["greedy", "sampled"])
def test_text_guidance_matches_the_reference(family, negative, options):
    """transformers' unbatched classifier-free guidance over the text: the unconditional branch read by the
    model in a cache of its own (Janus: guidance is for images only, in both)."""
    guidance = dict(guidance_scale=2.5)
    if negative != "last prompt token":
        rows = 2 if negative == "negative prompt" else 1
        guidance["negative_prompt_ids"] = torch.tensor([[5, 9, 14, 3], [0, 0, 7, 11]][:rows])
        guidance["negative_prompt_attention_mask"] = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]][:rows])
    if family.name == "idefics":
        family = _idefics_reference_reading_text_alone(family)
    if negative == "one negative prompt for all":
        # transformers reads one negative row for one prompt only: compare on the first prompt
        family = SimpleNamespace(**{**vars(family), "ref_inputs": {k: v[:1] for k, v in family.ref_inputs.items()},
                                    "inputs": {k: v[:1] for k, v in family.inputs.items()}})
    torch.manual_seed(3)
    expected = family.ref_model.generate(**family.ref_inputs, **family.mode, max_new_tokens=NEW_TOKENS,
                                         return_dict_in_generate=True, output_scores=True, **guidance, **options)
    torch.manual_seed(3)
    got = family.model.generate(**family.inputs, **family.mode, max_new_tokens=NEW_TOKENS,
                                return_dict_in_generate=True, output_scores=True, **guidance, **options)
    assert got.sequences.tolist() == expected.sequences.tolist()
    for want, have in zip(expected.scores, got.scores, strict=True):
        assert torch.allclose(have, want, atol=1e-4, rtol=0)
    if not options:  # greedy: guidance changed the answer (Janus: it did not)
        plain = family.plain.tolist()[:len(got.sequences)]
        assert (got.sequences.tolist() == plain) == (family.name == "janus")


def _idefics_reference_reading_text_alone(family):
    """transformers' IDEFICS fails on text guidance (its forward demands images): the reference becomes its
    guidance processor run by hand, reading the unconditional branch with a blank image that no token
    attends to (its gated cross-attention then adds nothing, as vlmkit's without images)."""
    ref_model = family.ref_model
    size = ref_model.config.vision_config.image_size

    def text_alone(ids, attention_mask=None, **options):
        return ref_model(ids, attention_mask=attention_mask, pixel_values=torch.zeros(ids.shape[0], 1, 3, size, size),
                         image_attention_mask=torch.zeros(ids.shape[0], ids.shape[1], 1, dtype=torch.long), **options)

    class GuidedReference:
        def generate(self, guidance_scale, negative_prompt_ids=None, negative_prompt_attention_mask=None, **options):
            guidance = transformers.generation.logits_process.UnbatchedClassifierFreeGuidanceLogitsProcessor(
                guidance_scale, text_alone, negative_prompt_ids, negative_prompt_attention_mask)
            return ref_model.generate(**options, logits_processor=[guidance])

    return SimpleNamespace(**{**vars(family), "ref_model": GuidedReference()})


def test_text_guidance_reads_each_prompts_negative_prompt_for_each_of_its_sequences(family):
    """transformers fails on a negative prompt with num_return_sequences > 1 (one unconditional row for
    each prompt, not for each sequence); vlmkit gives each sequence its prompt's negative prompt, drawing
    what transformers draws from prompts and negative prompts repeated by hand."""
    negative = dict(negative_prompt_ids=torch.tensor([[5, 9, 14, 3], [0, 0, 7, 11]]),
                    negative_prompt_attention_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]))
    options = dict(max_new_tokens=NEW_TOKENS, do_sample=True, top_k=20, guidance_scale=2.5, **family.mode)
    if family.name == "idefics":
        family = _idefics_reference_reading_text_alone(family)
    repeated = {k: v.repeat_interleave(2, dim=0) for k, v in family.ref_inputs.items()}
    torch.manual_seed(5)
    expected = family.ref_model.generate(**repeated, **{k: v.repeat_interleave(2, dim=0) for k, v in negative.items()},
                                         **options)
    torch.manual_seed(5)
    got = family.model.generate(**family.inputs, **negative, num_return_sequences=2, **options)
    assert got.tolist() == expected.tolist()


def test_text_guidance_refuses_a_negative_prompt_it_cannot_read(family):
    if family.name == "janus":
        pytest.skip("Janus generates text without guidance")
    generate = lambda **options: family.model.generate(**family.inputs, max_new_tokens=2, guidance_scale=2.0,  # noqa: E731
                                                      **options)
    with pytest.raises(InputError, match="rows for 2 prompts"):
        generate(negative_prompt_ids=torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(InputError, match="vocabulary"):
        generate(negative_prompt_ids=torch.tensor([[10**9]]))
    with pytest.raises(InputError, match="shape"):
        generate(negative_prompt_ids=torch.ones(2, 4, dtype=torch.long),
                 negative_prompt_attention_mask=torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(InputError, match="token ids"):
        generate(negative_prompt_ids=torch.ones(2, 4))


@pytest.mark.parametrize("option", list(UNSUPPORTED))
def test_options_vlmkit_cannot_honour_are_errors_naming_them(family, option):
    with pytest.raises(InputError, match=option):
        family.model.generate(**family.inputs, **family.mode, max_new_tokens=2, **{option: UNSUPPORTED[option]})


def test_unsupported_combinations_are_errors(family):
    generate = lambda **options: family.model.generate(**family.inputs, **family.mode, max_new_tokens=2, **options)  # noqa: E731
    with pytest.raises(InputError, match="attentions"):
        generate(return_dict_in_generate=True, output_attentions=True)
    with pytest.raises(InputError, match="num_return_sequences"):
        generate(num_beams=2, num_return_sequences=3)
    with pytest.raises(InputError, match="stream"):
        generate(num_beams=2, streamer=SimpleNamespace(put=lambda tokens: None, end=lambda: None))
    with pytest.raises(InputError, match="logits_processor"):
        generate(logits_processor=[42])
    with pytest.raises(InputError, match="max_new_tokens"):  # transformers: "must be greater than 0"
        family.model.generate(**family.inputs, **family.mode, max_new_tokens=0)
    with pytest.raises(InputError, match="low_memory"):  # transformers 5: "not supported after the beam search..."
        generate(num_beams=2, low_memory=True)
    # neutral values of options vlmkit does not implement change nothing, so they are accepted
    assert generate(epsilon_cutoff=0.0, num_beam_groups=1, output_attentions=False).shape[1] == family.prompt_length + 2
    inputs = dict(family.inputs, inputs=family.inputs["input_ids"])
    del inputs["input_ids"]  # transformers' keyword for the prompt
    assert family.model.generate(**inputs, **family.mode, max_new_tokens=2).tolist() == generate().tolist()


@pytest.mark.parametrize("warpers", [dict(min_p=0.1), dict(typical_p=0.7, top_k=0), dict(top_h=0.5, top_k=0)],
                         ids=["min-p", "typical", "top-h"])
def test_janus_image_generation_samples_with_the_sampling_options_as_the_reference(janus_dir, warpers):
    from janus_reference import ours, reference

    (ref_processor, ref_model), (processor, model) = reference(str(janus_dir)), ours(str(janus_dir))
    torch.manual_seed(0)
    expected = ref_model.generate(**ref_processor(text="A red square.", generation_mode="image", return_tensors="pt"),
                                  generation_mode="image", do_sample=True, **warpers)
    torch.manual_seed(0)
    got = model.generate(**processor(text="A red square.", generation_mode="image"), generation_mode="image",
                         do_sample=True, **warpers)
    assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("option", [dict(num_beams=2), dict(bad_words_ids=[[5]]), dict(logits_processor=[BanToken(5)]),
                                    dict(return_dict_in_generate=True), dict(max_time=1.0)])
def test_janus_image_generation_refuses_text_options(janus_dir, option):
    from janus_reference import ours

    processor, model = ours(str(janus_dir))
    inputs = processor(text="A red square.", generation_mode="image", return_tensors="pt")
    with pytest.raises(InputError, match=next(iter(option))):
        model.generate(**inputs, generation_mode="image", seed=0, **option)
