"""The pieces under the server, without HTTP: joining KV caches of different lengths, holding back
streamed text that may be a stop string, and the request path that batch jobs call directly."""

import torch
from serve_support import data_uri, engine_for, image_part, user

from vlmkit.generation.loop import prompt_positions
from vlmkit.serve.batching import keep_rows, merge_caches
from vlmkit.serve.config import ServeConfig
from vlmkit.serve.decoding import AnswerText
from vlmkit.serve.requests import RequestHandler
from vlmkit.serve.scheduler import Scheduler


def _prefilled(model, ids, room):
    cache = model.new_cache(1, ids.shape[1] + room)
    mask = torch.ones_like(ids)
    logits = model.prefill(ids, mask, prompt_positions(mask), cache)
    return cache, logits.argmax(-1), torch.tensor([[ids.shape[1]]])


def test_merged_caches_of_different_lengths_decode_as_each_alone(janus_dir, monkeypatch):
    model = engine_for(janus_dir).model
    with torch.inference_mode():
        _check_merge(model, monkeypatch)


def _nan_filled_empty(size, *, dtype=None, device=None, **unused):
    """torch.empty whose memory happens to hold NaNs (what a reused block may hold)."""
    return torch.full(size, float("nan"), dtype=dtype, device=device)


def _check_merge(model, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    short, long = (torch.randint(0, 500, (1, n), generator=generator) for n in (5, 17))
    alone = []
    for ids in (short, long):
        cache, token, position = _prefilled(model, ids, 4)
        alone.append(model.decode(token[:, None], position, cache))
    caches, tokens, positions = zip(*(_prefilled(model, ids, 4) for ids in (short, long)))
    with monkeypatch.context() as patch:  # a gap left as it came would poison the short row's attention
        patch.setattr(torch, "empty", _nan_filled_empty)
        merged = merge_caches(list(caches), room=4)
    assert merged.length == 17 and not bool(merged.key_mask[0, :12].any())  # the short row is left-padded
    assert not merged.keys[:, 0, :, :12].any() and not merged.values[:, 0, :, :12].any()  # and its gap is zeros
    together = model.decode(torch.cat(tokens)[:, None], torch.cat(positions), merged)
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-4, atol=1e-4)
    keep_rows(merged, torch.tensor([0]))  # the long request leaves: its padding columns go too
    assert merged.length == 6 and bool(merged.key_mask[:, :6].all())


class _CharTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def test_answer_text_holds_back_what_may_start_a_stop_string_and_never_sends_it():
    answer, sent = AnswerText(_CharTokenizer(), ["END"]), []
    for char in "hello ENtry END more":
        stopped = answer.add(ord(char))
        sent.append(answer.take_ready(finished=stopped))
        if stopped:
            break
    assert "".join(sent) == answer.final == "hello ENtry "
    assert sent[6:8] == ["", ""]  # "E", "EN" held until "t" showed they were not "END"


def test_answer_text_holds_back_an_incomplete_character():
    class Bytes(_CharTokenizer):
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    answer = AnswerText(Bytes(), [])
    euro = "€".encode()
    answer.add(ord("a"))
    assert answer.take_ready() == "a"
    for byte in euro[:-1]:
        answer.add(byte)
        assert answer.take_ready() == ""
    answer.add(euro[-1])
    assert answer.take_ready() == "€"


def test_request_handler_runs_a_batch_of_rows_with_the_servers_statuses_and_bodies(janus_dir):
    engine = engine_for(janus_dir)
    handler = RequestHandler(engine, ServeConfig(model=str(janus_dir)))
    scheduler = Scheduler(engine).start()
    try:
        chat = {"messages": user(image_part(data_uri(30, 30)), "What is it?"), "max_tokens": 5, "temperature": 0}
        rows = [("/v1/chat/completions", chat),
                ("/v1/chat/completions", {"messages": user("Hi"), "max_tokens": 9999}),
                ("/v1/images/generations", {"prompt": "a cat", "seed": 1}),
                ("/v1/embeddings", {}),
                ("/v1/chat/completions", {**chat, "messages": user("Another question")})]
        results = handler.run_many(scheduler, rows)
        assert [status for status, _ in results] == [200, 400, 200, 404, 200]
        assert results[0][1]["object"] == "chat.completion" and results[0][1]["usage"]["completion_tokens"] <= 5
        assert "context" in results[1][1]["error"]["message"]
        assert len(results[2][1]["data"]) == 1
        assert handler.run(scheduler, *rows[0])[1]["choices"] == results[0][1]["choices"]  # alone = in a batch
    finally:
        scheduler.stop()
