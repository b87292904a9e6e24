"""The image generation shapes, ``POST /v1/images/generations`` (pydantic): the request, with the
extras Janus samples with, and the images response."""

import time
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from ..generation.image_step import MAX_GUIDANCE_SCALE
from .fields import Flag, RequestModel, Seed, Text, json_int, json_number


# --- image generations: request ------------------------------------------------------------------
class ImageGenerationRequest(RequestModel):
    """``POST /v1/images/generations``; ``guidance_scale``, ``temperature``, ``top_k``, ``top_p`` are extras."""

    model: Text | None = None
    prompt: Text
    n: json_int(ge=1) = 1
    size: Text | None = None
    response_format: Text | None = None
    seed: Seed | None = None
    guidance_scale: json_number(ge=0, le=MAX_GUIDANCE_SCALE) | None = None  # None: the model's generation_config (else 5)
    temperature: json_number(ge=0.01, le=10) | None = None
    top_k: json_int(ge=0, le=2 ** 31 - 1) = 0
    top_p: json_number(gt=0, le=1) = 1.0
    stream: Flag = False  # server-sent events: partial pictures, then each finished one
    partial_images: json_int(ge=0, le=3) | None = None  # pictures so far sent while streaming
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: json_int(ge=0, le=100) | None = None  # jpeg and webp: 100 keeps the most detail
    background: Literal["auto", "opaque", "transparent"] | None = None  # Janus draws opaque pictures only
    # OpenAI's hints with one meaning here (Janus draws every picture the one way; no moderation pass)
    quality: Literal["auto", "low", "medium", "high", "standard", "hd"] | None = None
    style: Literal["vivid", "natural"] | None = None
    moderation: Literal["auto", "low"] | None = None
    user: Text | None = None

    @model_validator(mode="after")
    def _drawable(self):
        if self.background == "transparent":
            raise ValueError("background: 'transparent' is not available: Janus draws opaque pictures; send "
                             "'opaque' or 'auto', or leave it out")
        if self.output_compression is not None and self.output_format == "png":
            raise ValueError("output_compression: applies to output_format 'jpeg' or 'webp' (PNG is lossless)")
        return self


# --- image generations: response -----------------------------------------------------------------
class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int = Field(default_factory=lambda: int(time.time()))
    data: list[ImageData]
    background: Literal["opaque"] = "opaque"
    output_format: str = "png"
    quality: Literal["auto"] = "auto"
    size: str | None = None
    usage: dict | None = None
