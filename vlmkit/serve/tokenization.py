"""vLLM's ``POST /tokenize`` and ``POST /detokenize``: their request and response shapes, and the answers a
``RequestHandler`` gives (a prompt's ids, a conversation's chat-prompt ids with its images expanded, and
the text of token ids)."""

from pydantic import BaseModel, Field, model_validator

from .api_errors import ApiError
from .fields import Flag, RequestModel, Text, json_int, parse_request
from .requests import json_strings, message_texts
from .schemas import ChatMessage, TemplateVariables, check_continuation


class TokenizeRequest(RequestModel):
    """``POST /tokenize``: a ``prompt`` as it is (with BOS unless ``add_special_tokens`` is false), or chat
    ``messages`` as ``/v1/chat/completions`` builds their prompt (chat template, image tokens)."""

    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: Flag = True  # for a prompt; a chat template writes its own
    add_generation_prompt: Flag = True
    continue_final_message: Flag = False
    chat_template_kwargs: TemplateVariables | None = None
    return_token_strs: Flag = False  # vLLM's: each token's string (the vocabulary's entry) beside its id

    @model_validator(mode="after")
    def _one_input(self):
        if self.prompt is None and self.messages is None:
            raise ValueError("one of prompt (text) or messages (a conversation) is required")
        if self.prompt is not None and self.messages is not None:
            raise ValueError("give either prompt (text) or messages (a conversation), not both")
        check_continuation(self)
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int  # the model's context: the longest prompt and answer together
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestModel):
    """``POST /detokenize``: token ids back to text (special tokens included, as vLLM decodes them)."""

    model: Text | None = None
    tokens: list[json_int(ge=0, le=2 ** 31 - 1)] = Field(max_length=1 << 20)


class DetokenizeResponse(BaseModel):
    prompt: str


def tokenize(handler, body) -> dict:
    """vLLM's ``/tokenize``: the token ids of a prompt, or of a conversation's chat prompt as
    ``prepare_chat`` builds it (images fetched and expanded into their tokens)."""
    handler.check_chat_shape(body)
    request = parse_request(TokenizeRequest, body)
    handler.check_model(request.model)
    if request.prompt is not None:
        handler.check_prompt_size([request.prompt])
        ids = handler.engine.tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens)
    else:
        variables = handler.template_variables(request.chat_template_kwargs)
        handler.check_prompt_size([*message_texts(request.messages), *json_strings(variables)])
        inputs = handler.engine.prepare_chat(handler.engine_messages(request),
                                             add_generation_prompt=request.add_generation_prompt,
                                             continue_final_message=request.continue_final_message, **variables)
        ids = inputs["input_ids"][0].tolist()
    strings = handler.engine.tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=handler.engine.model.max_context, tokens=ids,
                            token_strs=strings).model_dump()


def detokenize(handler, body) -> dict:
    """vLLM's ``/detokenize``: the text of token ids."""
    request = parse_request(DetokenizeRequest, body)
    handler.check_model(request.model)
    vocab_size = handler.engine.tokenizer.backend.get_vocab_size(with_added_tokens=True)
    outside = [t for t in request.tokens if t >= vocab_size]
    if outside:
        raise ApiError(400, f"tokens: ids {outside[:5]} are outside the model's vocabulary of {vocab_size} tokens "
                            f"(ids 0 to {vocab_size - 1})")
    return DetokenizeResponse(prompt=handler.engine.tokenizer.decode(request.tokens)).model_dump()
