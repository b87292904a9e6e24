"""The two files of a batch job and what makes the job resumable.

The input is an OpenAI Batch API file: one JSON object per line with ``custom_id``, ``method``, ``url``
and ``body``. It is checked whole before any model loads: every line must be a JSON object with its
own non-empty ``custom_id``, since results are matched, and a killed job resumed, by that id.

The output holds one OpenAI batch output line per finished row, appended as whole lines and fsync'd,
so it is always a valid JSONL file except, after a kill mid-write, for a torn last line.
``ResultsFile.open`` cuts that line off and returns the ids already answered; the job skips them.
Nothing else is ever cut: an output that is the input, or that holds lines other than batch results,
is refused before any work. An exclusive lock keeps two jobs from appending to one output at once."""

from __future__ import annotations

import json
import os
import stat
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import VlmkitError

_SHOWN = 5  # problems listed in one error message
# Every line ``encode_line`` writes for ``output_line`` starts so; a torn last line starts as a prefix of it.
_RESULT_START = b'{"id":"batch_req_'


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
    if not str(path):  # Path("") is ".", a directory: say what is really wrong
        raise BatchFileError("the input path is empty; give the batch JSONL file (--input)")
    path = Path(path)
    if path.is_dir():
        raise BatchFileError(f"the input {str(path)!r} is a directory; give the batch JSONL file (--input)")
    if not path.is_file():
        if path.exists():  # a device, a pipe (<(...)), a socket: the file is read twice, checked then run
            raise BatchFileError(f"the input {str(path)!r} is not a regular file (a device, pipe or socket); write "
                                 f"the rows to a JSONL file and give that (--input)")
        raise BatchFileError(f"the input file {str(path)!r} does not exist")
    problems, seen, ids = [], {}, []
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                custom_id = row_custom_id(parse_line(raw))
            except BatchFileError as err:
                problems.append(f"line {number}: {err}")
                continue
            if custom_id in seen:
                problems.append(f"line {number}: custom_id {custom_id!r} is already used on line {seen[custom_id]}")
                continue
            seen[custom_id] = number
            ids.append(custom_id)
    if not ids and not problems:
        raise BatchFileError(f"{path}: the input has no requests (it is empty or only blank lines); give a JSONL "
                             f"file with one request per line")
    if problems:
        more = f"; and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
        raise BatchFileError(f"{path}: {len(problems)} line(s) cannot be run: " + "; ".join(problems[:_SHOWN]) + more +
                             ". Every line must be a JSON object with its own custom_id (results are matched and "
                             "resumed by it); fix the file and run again")
    return InputSummary(path, ids)


def parse_line(raw: str | bytes):
    """One line's JSON value, or ``BatchFileError`` saying why it cannot be read (Python's own limits
    included: nesting deeper than the recursion limit, integers of more than 4300 digits)."""
    if isinstance(raw, bytes) and _wide_text(raw):
        raise BatchFileError("the line is UTF-16 or UTF-32 text; save the file as UTF-8")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BatchFileError(f"not valid JSON ({err})") from None
    except RecursionError:
        raise BatchFileError("the JSON is nested too deeply to read") from None
    except ValueError:  # int(): "Exceeds the limit (4300 digits) for integer string conversion"
        raise BatchFileError(f"a number has more than {sys.get_int_max_str_digits()} digits; write it as a "
                             f"string") from None


def _wide_text(raw: bytes) -> bool:
    """Whether json would read the line as UTF-16/32 (a BOM, or NUL bytes among its first four). It reads
    such a line alone, but a file split at b"\n" is torn mid-character, and Ray workers read UTF-8 only."""
    return json.detect_encoding(raw) not in ("utf-8", "utf-8-sig") and bool(raw.strip(b"\0\r\n"))


def row_custom_id(row) -> str:
    """The row's custom_id, or ``BatchFileError`` saying what is wrong with it."""
    if not isinstance(row, dict):
        raise BatchFileError("a row must be a JSON object with custom_id, method, url and body")
    custom_id = row.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise BatchFileError("custom_id is missing or not a non-empty string")
    try:
        custom_id.encode("utf-8")  # the derived seed hashes it, and the output writes it, as UTF-8
    except UnicodeEncodeError:
        raise BatchFileError(f"custom_id {custom_id!r} is not valid Unicode (it holds a lone surrogate "
                             f"escape such as \\ud800); give every row a custom_id of whole characters") from None
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
        if not str(path):  # Path("") is ".", a directory: say what is really wrong
            raise BatchFileError("the output path is empty; give a file path for the results (--output), e.g. "
                                 "'results.jsonl'")
        self.path = Path(path)
        self._fd: int | None = None

    def open(self, expected_ids=None, input_path=None) -> set[str]:
        """Lock the file, cut off a torn last line, and return the custom_ids already written. With
        ``expected_ids`` (the input's ids), an output holding other ids is refused: it belongs to
        another job. With ``input_path``, an output that is that file (by any name) is refused."""
        self._check_path(input_path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as err:
            raise BatchFileError(f"cannot open --output {str(self.path)!r}: {err.strerror or err}; give a path "
                                 f"where a new file can be written") from None
        try:
            self._lock()
            done, good_end, unended = self._read_done()
            if good_end < os.fstat(self._fd).st_size:
                os.ftruncate(self._fd, good_end)  # the line a kill tore; its row runs again
                os.fsync(self._fd)
            if unended:  # a whole last line without its newline: end it, or the next result joins it
                self.append([])
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
        """Write whole lines at the end of the file, then flush them to disk (one fsync per call).
        No lines (``open`` ending an unended last line) writes just a newline."""
        data = b"".join(encode_line(line) for line in lines) or b"\n"
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

    def _check_path(self, input_path) -> None:
        """Refuse, before anything is created or read, an output that is the input or not a plain file."""
        if input_path is not None and _same_file(self.path, Path(input_path)):
            raise BatchFileError(f"--output {str(self.path)!r} is the input file; results would overwrite the "
                                 f"requests. Give a new path for the results, e.g. {_results_name(input_path)!r}")
        try:
            mode = self.path.stat().st_mode
        except FileNotFoundError:
            return
        except OSError as err:  # a parent that is a file, a path too long, no permission...
            raise BatchFileError(f"cannot use --output {str(self.path)!r}: {err.strerror or err}; give a path "
                                 f"where a new file can be written") from None
        if stat.S_ISDIR(mode):
            raise BatchFileError(f"--output {str(self.path)!r} is a directory; give a file path for the results, "
                                 f"e.g. {str(self.path / 'results.jsonl')!r}")
        if not stat.S_ISREG(mode):
            raise BatchFileError(f"--output {str(self.path)!r} is not a regular file (a device, pipe or socket); "
                                 f"results are appended and synced to disk, so give a path for a file")

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

    def _read_done(self) -> tuple[set[str], int, bool]:
        """The custom_ids of the whole lines, the byte offset where the last whole line ends, and whether
        that line lacks its newline. Every whole line must be a batch output line; a last line without its
        newline that is a complete one is kept (a script that rewrote the file may have dropped the final
        newline), and one that only starts as one (or is zeros, as a crash can leave) is a torn write, cut
        off by ``open``. Anything else means the file is not (only) this job's output, and it is refused
        rather than cut."""
        done, good_end, unended = set(), 0, False
        with open(self.path, "rb") as lines:
            for number, raw in enumerate(lines, start=1):
                custom_id = _written_id(raw)
                if not raw.endswith(b"\n"):
                    if custom_id is None and _torn(raw):
                        break
                    unended = custom_id is not None
                if custom_id is None:
                    raise BatchFileError(f"--output {str(self.path)!r}: line {number} is not a batch output line "
                                         f"({_shown(raw)}), so this file is not the output of a vlmkit batch job "
                                         f"and would be overwritten. Give a new --output path, or delete this file "
                                         f"if it is not needed")
                done.add(custom_id)
                good_end += len(raw)
        return done, good_end, unended


def _written_id(raw: bytes) -> str | None:
    try:
        line = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str) or "response" not in line:
        return None
    return line["custom_id"]


def _torn(tail: bytes) -> bool:
    """Whether a last line without its newline is what a kill mid-write leaves: the start of a result line."""
    return tail.startswith(_RESULT_START) or _RESULT_START.startswith(tail) or not tail.strip(b"\0")


def _shown(raw: bytes) -> str:
    text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
    return repr(text[:40] + ("..." if len(text) > 40 else "")) if text.strip() else "a blank line"


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same resolved path (symlinks, ``..``), or the same inode (hard links)."""
    try:
        if a.resolve() == b.resolve():
            return True
        return os.path.samefile(a, b)
    except (OSError, RuntimeError):  # one does not exist (yet), or a symlink loop
        return False


def _results_name(input_path) -> str:
    path = Path(input_path)
    return str(path.with_name(path.stem + ".results.jsonl"))


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
