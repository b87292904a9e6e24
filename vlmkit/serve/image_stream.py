"""Streamed image generation, as OpenAI's image API streams: ``image_generation.partial_image`` events
showing each picture so far, then one ``image_generation.completed`` event per picture.

The worker's ``ImageDecoder`` calls ``PartialImages.after_token`` after every drawn token; at the
points ``partial_points`` names it decodes the tokens drawn so far with the VQ decoder (the rows not
drawn yet are painted a neutral grey) and reports them through ``Job.partial_image``. Nothing here
touches the random generator, so the final picture is the one an unstreamed request draws."""

import base64
import io
import json
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .events import JobEnd, JobFailed

NEUTRAL_FILL = 128  # the grey of the rows not drawn yet


@dataclass
class PartialImage:
    """A job event: picture ``index`` of the request as drawn so far (``partial_index`` counts from 0)."""

    index: int
    partial_index: int
    image: object  # PIL image


def partial_points(num_tokens: int, partial_images: int) -> list[int]:
    """After how many tokens each partial picture is sent: evenly spread, never at the last token
    (the finished picture is the completed event)."""
    return [num_tokens * (i + 1) // (partial_images + 1) for i in range(partial_images)]


class PartialImages:
    """Decodes the pictures of streaming jobs at their partial points (runs on the worker thread)."""

    def __init__(self, model, processor):
        self.model = model
        self.processor = processor

    def after_token(self, images: list) -> None:
        """``images``: ImageRows that just drew a token; those of jobs asking for partial pictures and at one
        of their points are decoded together and sent."""
        due = []
        for image in images:
            wanted = image.job.task.partial_images
            if not wanted or image.job.cancelled:
                continue
            points = partial_points(self.model.num_image_tokens, wanted)
            if len(image.tokens) in points:
                due.append((image, points.index(len(image.tokens))))
        if not due:
            return
        pictures = self.pictures([image.tokens for image, _ in due])
        for (image, partial_index), picture in zip(due, pictures):
            image.job.partial_image(PartialImage(image.index, partial_index, picture))

    def pictures(self, token_lists: list[list[int]]) -> list:
        """PIL pictures of partly drawn token grids: the missing tokens decode as token 0, then their pixels
        (the rest of a half-drawn token row and every row below it) are painted grey."""
        total = self.model.num_image_tokens
        side = int(round(total ** 0.5))
        grid = torch.zeros(len(token_lists), total, dtype=torch.long)
        for row, tokens in enumerate(token_lists):
            grid[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        pixels = self.model.decode_image_tokens(grid.to(self.model.device))
        pictures = self.processor.postprocess(list(pixels.float()), return_tensors="PIL.Image.Image")["pixel_values"]
        out = []
        for picture, tokens in zip(pictures, token_lists):
            array = np.asarray(picture).copy()
            cell = array.shape[0] // side
            full_rows, partial = divmod(len(tokens), side)
            array[(full_rows + 1) * cell:] = NEUTRAL_FILL
            array[full_rows * cell:(full_rows + 1) * cell, partial * cell:] = NEUTRAL_FILL
            out.append(Image.fromarray(array))
        return out


def encoded_base64(image, output_format: str = "png", compression: int | None = None) -> str:
    """A picture as OpenAI's ``b64_json``: the file of ``output_format`` ("png", "jpeg", "webp"), base64;
    ``compression`` (0-100, OpenAI's ``output_compression``; 100 keeps the most detail) for jpeg and webp."""
    buffer = io.BytesIO()
    options = {} if output_format == "png" else {"quality": 100 if compression is None else max(compression, 1)}
    image.save(buffer, format=output_format.upper(), **options)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def image_event(kind: str, image, index: int, size: str, picture_format: tuple = ("png", None), **fields) -> str:
    """One server-sent event as OpenAI's image stream writes it (``event:`` names the type, ``data:``
    holds it); ``index`` is the picture's place in the request (an extra field, for ``n`` > 1);
    ``picture_format``: (output_format, output_compression)."""
    body = {"type": f"image_generation.{kind}", "b64_json": encoded_base64(image, *picture_format),
            "created_at": int(time.time()), "size": size, "quality": "auto", "background": "opaque",
            "output_format": picture_format[0], "index": index, **fields}
    return f"event: {body['type']}\ndata: {json.dumps(body)}\n\n"


def completed_usage(prompt_tokens: int, image_tokens: int) -> dict:
    """OpenAI's image usage for one picture: the prompt's text tokens in, the picture's tokens out."""
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"text_tokens": prompt_tokens, "image_tokens": 0},
            "output_tokens": image_tokens, "total_tokens": prompt_tokens + image_tokens}


async def image_sse(stream, size: str, prompt_tokens: int, image_tokens: int, error_body, to_thread,
                    picture_format: tuple = ("png", None)):
    """The server-sent events of a streamed image job. ``stream`` is the job's events as they come (it ends
    early when the client goes away, which cancels the job); ``error_body(err)`` is the error as the
    API answers it; ``to_thread(fn, *args)`` runs picture encoding off the event loop."""
    try:
        async for item in stream:
            if isinstance(item, PartialImage):
                yield await to_thread(image_event, "partial_image", item.image, item.index, size, picture_format,
                                      partial_image_index=item.partial_index)
            elif isinstance(item, JobEnd):
                usage = completed_usage(prompt_tokens, image_tokens)
                for index, image in enumerate(item.outcome.images):
                    yield await to_thread(image_event, "completed", image, index, size, picture_format, usage=usage)
                return
            elif isinstance(item, JobFailed):
                yield f"event: error\ndata: {json.dumps(error_body(item.error))}\n\n"
                return
    finally:
        await stream.aclose()
