"""The field types every request shape is built from, and how a body is validated against a shape.

Values are checked as OpenAI's API documents their types, strictly: an integer field takes a JSON
integer (not "5", 5.0 or true), a number field a finite number within its bounds, a string valid
Unicode; so nothing a client sends reaches sampling as inf or nan, or fails later as a 500. Unknown
request fields are ignored (``RequestModel``), as OpenAI-compatible servers do."""

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import InputError
from ..generation.config import SEED_RANGE
from ..io.text import unpaired_surrogate


def _nullable_defaults(schema: dict, model) -> None:
    """The published schema allows what ``_null_is_the_default`` takes: null for every option with a default."""
    properties = schema.get("properties", {})
    for name, field in model.model_fields.items():
        key = field.alias or name
        if key in properties and not field.is_required() and field.default is not None:
            shown = {k: properties[key].pop(k) for k in ("title", "default", "description") if k in properties[key]}
            properties[key] = {"anyOf": [properties[key], {"type": "null"}], **shown}


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="ignore", json_schema_extra=_nullable_defaults)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, values):
        """An explicit null for an option with a default (``"n": null``, ``"stream": null``, as clients send
        options they leave unset) takes that default, as OpenAI's API does."""
        if isinstance(values, dict):
            fields = cls.model_fields
            return {key: value for key, value in values.items()
                    if not (value is None and key in fields and not fields[key].is_required()
                            and fields[key].default is not None)}
        return values


def valid_unicode(text: str) -> str:
    """``text`` itself, or a ValueError if it holds an unpaired surrogate (which no UTF-8 can carry)."""
    problem = unpaired_surrogate(text)
    if problem:
        raise ValueError(f"the text holds {problem}; send valid Unicode text")
    return text


def json_int(**bounds):
    """A JSON integer (strict: not a string, float or boolean) within ``bounds``."""
    return Annotated[int, Field(strict=True, **bounds)]


def json_number(**bounds):
    """A finite JSON number within ``bounds`` (integers are taken as floats; strings and booleans are not)."""
    return Annotated[float, Field(strict=True, allow_inf_nan=False, **bounds)]


Text = Annotated[str, Field(strict=True), AfterValidator(valid_unicode)]
Flag = Annotated[bool, Field(strict=True)]
Seed = json_int(ge=SEED_RANGE[0], le=SEED_RANGE[1])


def parse_request(model: type[BaseModel], body) -> BaseModel:
    """Validate a JSON body against ``model``; a bad body is an ``InputError`` naming the fields."""
    if not isinstance(body, dict):
        raise InputError("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise InputError(describe_validation_error(err)) from None


def describe_validation_error(err: ValidationError) -> str:
    """A one-line account of what is wrong, naming each field and the value it got:
    ``messages.0.role: Input should be 'system', ... (got 'robot')``."""
    problems = [(_field_path(problem["loc"]), problem) for problem in err.errors()]
    lines = []
    for path, problem in problems:
        # a union's other branches ("Input should be a valid list" beside a problem inside the string)
        if problem["type"].endswith("_type") and any(
                other is not problem and other_path[:len(path)] == path and
                (len(other_path) > len(path) or not other["type"].endswith("_type"))
                for other_path, other in problems):
            continue
        message = problem["msg"].removeprefix("Value error, ")
        value = problem.get("input")
        if isinstance(value, (bool, int, float)) or (isinstance(value, str) and problem["type"] != "value_error"):
            message += f" (got {shown_value(value)})"
        name = ".".join(str(p) for p in path)
        lines.append(f"{name}: {message}" if name else message)
        if len(lines) == 3:
            break
    return "invalid request: " + "; ".join(lines)


def _field_path(loc: tuple) -> tuple:
    """``loc`` without pydantic's union-branch labels ("str", "list[...]", "function-after[...]") and the
    tag a content part's type adds (``content.0.text.text`` is ``content.0.text``)."""
    path = [p for p in loc if isinstance(p, int) or ("[" not in p and p not in ("str", "list", "dict", "int",
                                                                               "float", "bool"))]
    return tuple(p for i, p in enumerate(path)
                 if not (i and isinstance(path[i - 1], int) and p in _PART_TAGS and i + 1 < len(path)))


_PART_TAGS = ("text", "image_url", "video_url")


def shown_value(value) -> str:
    """A value as an error message quotes it: its repr, cut to 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."

