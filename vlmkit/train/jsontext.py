"""JSON text of a training run (a recipe, a data line) read with every failure as one ``InputError``
naming where: bad JSON, and Python's own limits (nesting deeper than the recursion limit, integers of
more than 4300 digits), which ``json.loads`` raises as other errors."""

from __future__ import annotations

import json
import sys

from ..errors import InputError


def parse_json(text: str, where: str):
    """The JSON value of ``text``; ``where`` starts the error (e.g. "recipe run.json is", "data.jsonl:3 is")."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{where} not valid JSON: {err}") from None
    except RecursionError:
        raise InputError(f"{where} JSON nested too deeply to read; flatten it") from None
    except ValueError:  # int(): "Exceeds the limit (4300 digits) for integer string conversion"
        raise InputError(f"{where} JSON with a number of more than {sys.get_int_max_str_digits()} digits; write "
                         f"it as a string or shorten it") from None
