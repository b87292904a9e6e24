"""Batch input and output files at their edges: an output whose last whole line lost its newline, a UTF-8
BOM or UTF-16 input (local and on Ray workers), an input with no requests, the body size --max-body-bytes
measures, and rows whose url or method is null."""

import json

import numpy as np
import pytest
from batch_support import read_output, run_in_process, write_rows
from serve_support import user

from vlmkit.batch import ResultsFile
from vlmkit.batch.ray_data import _batch_rows, _line_text
from vlmkit.batch.rows import BatchRequest
from vlmkit.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny model: one thread (conftest.py)


def _row(custom_id: str, **fields) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": user("Hi"), "max_tokens": 1, "temperature": 0}, **fields}


def _batch(tmp_path, source) -> int:
    return main(["batch", "--model", str(tmp_path / "no-such-model"), "--input", str(source), "--output",
                 str(tmp_path / "out.jsonl"), "--quiet"])


@pytest.mark.parametrize("dumps", [json.dumps, lambda line: json.dumps(line, separators=(",", ":"))])
def test_a_whole_last_line_without_its_newline_is_kept_and_ended(tmp_path, dumps):
    # what "\n".join(json.dumps(line) for line in kept) leaves after filtering an output
    lines = [{"id": f"batch_req_{i}", "custom_id": c, "response": {"status_code": 200}} for i, c in enumerate("ab")]
    output = tmp_path / "out.jsonl"
    output.write_text("\n".join(dumps(line) for line in lines))
    with ResultsFile(output) as results:
        assert results.open({"a", "b", "c"}) == {"a", "b"}
        results.append([{"id": "batch_req_2", "custom_id": "c", "response": {"status_code": 200}}])
    assert [line["custom_id"] for line in read_output(output)] == ["a", "b", "c"]


def test_an_input_without_requests_is_refused_before_anything_is_written(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    for content in (b"", b"\n  \n\r\n"):
        source.write_bytes(content)
        assert _batch(tmp_path, source) == 1
        message = capsys.readouterr().err
        assert message.startswith("vlmkit: error: ") and "the input has no requests" in message, message
        assert "Traceback" not in message and not (tmp_path / "out.jsonl").exists()


def test_a_utf16_input_is_refused_by_line_naming_the_encoding(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_bytes("".join(json.dumps(_row(c)) + "\n" for c in "ab").encode("utf-16"))
    assert _batch(tmp_path, source) == 1
    message = capsys.readouterr().err
    assert "line 1: the line is UTF-16 or UTF-32 text; save the file as UTF-8" in message, message
    assert not (tmp_path / "out.jsonl").exists()


def test_ray_workers_read_a_bom_line_as_the_local_job_does():
    line = "\ufeff" + json.dumps(_row("a"))
    assert _line_text(line.encode("utf-8") + b"\r\n") == json.dumps(_row("a"))
    # a user's own read_text pipeline keeps the BOM: the row still runs, under its custom_id
    (request,) = _batch_rows({"text": np.array([line], dtype=object)})
    assert isinstance(request, BatchRequest) and request.custom_id == "a"


def test_max_body_bytes_counts_the_body_in_utf8_whatever_the_custom_id(janus_dir, tmp_path):
    body = {"messages": user("日本" * 1500), "max_tokens": 1, "temperature": 0}
    size = len(json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    rows = [{"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
            for custom_id in ("short", "long-" + "x" * 2000)]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))  # ASCII escapes: 6 bytes a character
    run_in_process(janus_dir, source, tmp_path / "out.jsonl", limits=_limits(janus_dir, size + 100))
    statuses = {line["custom_id"]: line["response"]["status_code"] for line in read_output(tmp_path / "out.jsonl")}
    assert len(statuses) == 2 and 413 not in statuses.values(), statuses  # (the tiny model's context may say 400)
    run_in_process(janus_dir, source, tmp_path / "small.jsonl", limits=_limits(janus_dir, size - 1))
    for line in read_output(tmp_path / "small.jsonl"):
        assert line["response"]["status_code"] == 413 and f"the request body is {size} bytes" in line["error"]["message"], line


def test_a_null_url_or_method_is_named_as_missing(janus_dir, tmp_path):
    source = write_rows(tmp_path / "in.jsonl", [_row("no-url", url=None), _row("null-method", method=None),
                                                {k: v for k, v in _row("absent-url").items() if k != "url"}])
    run_in_process(janus_dir, source, tmp_path / "out.jsonl")
    errors = {line["custom_id"]: (line["response"]["status_code"], line["error"]["message"])
              for line in read_output(tmp_path / "out.jsonl")}
    for custom_id, field in (("no-url", "url"), ("null-method", "method"), ("absent-url", "url")):
        status, message = errors[custom_id]
        assert status == 400 and f"the row's {field} is missing or null" in message and "None" not in message


def _limits(janus_dir, max_body_bytes: int):
    from dataclasses import replace

    from batch_support import serve_config
    return replace(serve_config(janus_dir).limits, max_body_bytes=max_body_bytes)
