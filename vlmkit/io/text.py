"""Checks and clean-ups of text the tokenizer takes and gives (the server's request fields check with them
too): text that is not Unicode, and the spaces transformers' decode cleans up."""

from ..errors import InputError


def unpaired_surrogate(text: str) -> str | None:
    """Where ``text`` holds an unpaired surrogate (so it is not Unicode text and cannot be encoded), as a
    phrase for an error; None when it holds none."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"an unpaired surrogate ({text[err.start]!r} at character {err.start})"
    return None


def refuse_surrogates(text: str) -> None:
    """An InputError where ``text`` is not Unicode text (an unpaired surrogate), saying how to mend it."""
    problem = unpaired_surrogate(text)
    if problem:
        raise InputError(f"the text holds {problem}, which is not Unicode text; decode its bytes with "
                         f"errors='replace' first")


def clean_up_spaces(text: str) -> str:
    """transformers' ``clean_up_tokenization``: the spaces a word-piece decode leaves before punctuation and
    English contractions taken out."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text
