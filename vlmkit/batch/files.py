"""The two files of a batch job and what makes the job resumable.

The input is an OpenAI Batch API file: one JSON object per line with ``custom_id``, ``method``, ``url``
and ``body``. It is checked whole before any model loads: every line must be a JSON object with its
own non-empty ``custom_id``, since results are matched, and a killed job resumed, by that id.

The output holds one OpenAI batch output line per finished row, appended as whole lines and fsync'd,
so it is always a valid JSONL file except, after a kill mid-write, for a torn last line.
``ResultsFile.open`` cuts that line off and returns the ids already answered; the job skips them.
An exclusive lock keeps two jobs from appending to one output at once."""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import VlmkitError

_SHOWN = 5  # problems listed in one error message


class BatchFileError(VlmkitError):
    """The input or output file of a batch job cannot be used as it is (the message says why and where)."""


@dataclass
class InputSummary:
    """What the check of an input file found: every row's custom_id, in file order."""

    path: Path
    custom_ids: list[str]

    @property
    def total(self) -> int:
        return len(self.custom_ids)


def scan_input(path) -> InputSummary:
    """Check every line of an input file; raise ``BatchFileError`` listing the lines that cannot be run
    (not JSON, not an object, no ``custom_id``) and custom_ids used twice. Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise BatchFileError(f"the input file {str(path)!r} does not exist")
    problems, seen, ids = [], {}, []
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                custom_id = row_custom_id(json.loads(raw))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                problems.append(f"line {number}: not valid JSON ({err})")
                continue
            except BatchFileError as err:
                problems.append(f"line {number}: {err}")
                continue
            if custom_id in seen:
                problems.append(f"line {number}: custom_id {custom_id!r} is already used on line {seen[custom_id]}")
                continue
            seen[custom_id] = number
            ids.append(custom_id)
    if problems:
        more = f"; and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
        raise BatchFileError(f"{path}: {len(problems)} line(s) cannot be run: " + "; ".join(problems[:_SHOWN]) + more +
                             ". Every line must be a JSON object with its own custom_id (results are matched and "
                             "resumed by it); fix the file and run again")
    return InputSummary(path, ids)


def row_custom_id(row) -> str:
    """The row's custom_id, or ``BatchFileError`` saying what is wrong with it."""
    if not isinstance(row, dict):
        raise BatchFileError("a row must be a JSON object with custom_id, method, url and body")
    custom_id = row.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise BatchFileError("custom_id is missing or not a non-empty string")
    return custom_id


def output_line(custom_id: str | None, status: int, body: dict) -> dict:
    """One OpenAI batch output line. A row that did not succeed also names its error in ``error``
    (code and message, as in its response body), so failures can be picked out with ``error != null``."""
    error = None
    if status != 200:
        detail = body.get("error", {}) if isinstance(body, dict) else {}
        error = {"code": detail.get("code") or str(status), "message": detail.get("message", "")}
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}", "body": body},
            "error": error}


def encode_line(line: dict | str) -> bytes:
    """A line as written to the output: UTF-8 compact JSON, newline-terminated (``line`` may already be
    the JSON text)."""
    text = line if isinstance(line, str) else json.dumps(line, ensure_ascii=False, separators=(",", ":"))
    return (text + "\n").encode("utf-8", errors="backslashreplace")  # a lone surrogate stays a JSON escape


class ResultsFile:
    """The output of a batch job: open it (recovering after a kill), then append whole lines."""

    def __init__(self, path):
        self.path = Path(path)
        self._fd: int | None = None

    def open(self, expected_ids=None) -> set[str]:
        """Lock the file, cut off a torn last line, and return the custom_ids already written. With
        ``expected_ids`` (the input's ids), an output holding other ids is refused: it belongs to
        another job."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            self._lock()
            done, good_end = self._read_done()
            if good_end < os.fstat(self._fd).st_size:
                os.ftruncate(self._fd, good_end)  # the line a kill tore; its row runs again
                os.fsync(self._fd)
            if created:
                _fsync_dir(self.path.parent)
            if expected_ids is not None:
                strangers = done - set(expected_ids)
                if strangers:
                    example = sorted(strangers)[0]
                    raise BatchFileError(f"{self.path} holds results for {len(strangers)} custom_id(s) that are not in "
                                         f"the input (e.g. {example!r}): it is the output of another job. Give a new "
                                         f"--output, or delete this one to start over")
        except BaseException:
            self.close()
            raise
        return done

    def append(self, lines: list[dict | str]) -> None:
        """Write whole lines at the end of the file, then flush them to disk (one fsync per call)."""
        data = b"".join(encode_line(line) for line in lines)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # also releases the lock
            self._fd = None

    def __enter__(self) -> "ResultsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory lock; one job per output is then up to the user
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BatchFileError(f"another vlmkit batch job is writing {self.path}; wait for it to finish (or stop "
                                 f"it) before running this one") from None

    def _read_done(self) -> tuple[set[str], int]:
        """The custom_ids of the whole lines, and the byte offset where the last good line ends. Bad
        lines are allowed only at the end (a torn write, or zeros after a crash); one followed by good
        lines means someone else wrote to the file."""
        done, offset, good_end, bad_at = set(), 0, 0, None
        with open(self.path, "rb") as lines:
            for number, raw in enumerate(lines, start=1):
                offset += len(raw)
                custom_id = _written_id(raw) if raw.endswith(b"\n") else None
                if custom_id is None:
                    bad_at = bad_at or number
                    continue
                if bad_at is not None:
                    raise BatchFileError(f"{self.path}: line {bad_at} is not a batch output line, but more results "
                                         f"follow it; this file was not written by vlmkit batch alone. Give a new "
                                         f"--output")
                done.add(custom_id)
                good_end = offset
        return done, good_end


def _written_id(raw: bytes) -> str | None:
    try:
        line = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str) or "response" not in line:
        return None
    return line["custom_id"]


def _fsync_dir(folder: Path) -> None:
    """Make a new file's directory entry durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
