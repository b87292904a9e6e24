"""The media a chat or completion names, checked and loaded under the server's policy and limits: the
counts of images and video frames, every URL's scheme before anything is fetched, and the pixels of a
request's images together. ``MediaLoading`` is the part of ``RequestHandler`` that does it."""

import functools
import re
from dataclasses import replace

from ..errors import MediaError, TooManyPixels
from ..io.media import load_image
from .api_errors import ApiError
from .options import tool_call_text
from .schemas import ChatCompletionRequest

VIDEO_FAMILIES = ("llava_onevision",)  # model types whose processors take video content blocks
_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


def names_remote_media(body) -> bool:
    """Whether a request body (parsed JSON) holds an http(s) URL anywhere: such a request may wait on the
    network while it is prepared."""
    stack = [body]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if item[:8].lower().startswith(("http://", "https://")):
                return True
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class MediaLoading:
    """Turns a request's image and video parts into the Engine's content blocks; a base of ``RequestHandler``,
    whose ``engine``, ``config``, ``limits`` and ``policy`` it reads."""

    @property
    def _default_frames(self) -> int:
        return min(self.limits.video_frames, self.limits.max_video_frames)

    def engine_messages(self, request: ChatCompletionRequest) -> list[dict]:
        """OpenAI messages as the Engine's content-block messages, media loaded under the server's policy."""
        parts = [part for message in request.messages if isinstance(message.content, list)
                 for part in message.content]
        self._check_media_counts(parts)
        for i, message in enumerate(request.messages):  # every URL is checked before any is fetched
            for j, part in enumerate(message.content if isinstance(message.content, list) else ()):
                if part.type != "text":
                    self._check_url(part, f"messages[{i}].content[{j}]")
        converted, pixels = [], [0]  # pixels: summed over the images loaded so far
        for i, message in enumerate(request.messages):
            content = message.content
            if isinstance(content, list):
                content = [self._block(part, f"messages[{i}].content[{j}]", pixels) for j, part in enumerate(content)]
            converted.append(self._template_message(message, content))
        return converted

    def _template_message(self, message, content) -> dict:
        """One message as transformers' apply_chat_template receives OpenAI's: developer as system, no content
        (null, "" or []) as "" (templates read the first text block, and a continued message continues ""),
        an assistant's tool_calls and a tool result's tool_call_id kept."""
        role = "system" if message.role == "developer" else message.role
        entry = {"role": role, "content": content or ""}
        if message.tool_calls:
            entry["tool_calls"] = [call.for_template() for call in message.tool_calls]
            if not content and not self._template_renders_tool_calls:  # else the turn would show nothing
                entry["content"] = tool_call_text(message.tool_calls)
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        return entry

    @functools.cached_property
    def _template_renders_tool_calls(self) -> bool:
        """Whether the checkpoint's chat template writes an assistant's tool_calls (the families' own do not)."""
        return "tool_calls" in (getattr(self.engine.processor, "chat_template", None) or "")

    def load_media(self, parts: list[tuple[str, object]]) -> list[dict]:
        """(where, part) pairs of image and video parts (``ImagePart``/``VideoPart`` outside any message: a
        completion's ``multi_modal_data``) as the Engine's image and video blocks, under a chat's limits and
        media policy: the counts, then every URL, before anything is fetched; ``where`` names a part in errors."""
        self._check_media_counts([part for _, part in parts])
        for where, part in parts:
            self._check_url(part, where)
        pixels = [0]  # summed over the images loaded so far
        return [self._block(part, where, pixels) for where, part in parts]

    def _check_media_counts(self, parts: list) -> None:
        """Refuse more images than --max-images, videos asking for more frames than --max-video-frames, and
        video for a family that takes none."""
        images = sum(part.type == "image_url" for part in parts)
        if images > self.limits.max_images:
            raise ApiError(400, f"the request has {images} images; this server takes at most {self.limits.max_images} "
                                f"per request (--max-images)")
        videos = [part for part in parts if part.type == "video_url"]
        for part in videos:
            frames = self._frames_asked(part.video_url)
            if frames is not None and frames > self.limits.max_video_frames:
                raise ApiError(400, f"a video asks for {frames} frames; this server samples at most "
                                    f"{self.limits.max_video_frames} frames per video (--max-video-frames)")
        if videos and self.engine.model_type not in VIDEO_FAMILIES:
            raise ApiError(400, f"this model ({self.engine.model_type}) does not take video; send images instead")

    def _check_url(self, part, where: str) -> None:
        url = (part.image_url if part.type == "image_url" else part.video_url).url
        if "\x00" in url:  # no path, URL or base64 text holds one; the OS refuses it with a ValueError
            raise ApiError(400, f"{where}: the URL holds a NUL character (\\u0000); send the URL or data: URI "
                                f"without it")
        scheme = _URL_SCHEME.match(url)
        if scheme is not None and scheme.group(1).lower() == "data" and not url.isascii():
            raise ApiError(400, f"{where}: the data: URI holds characters that are not ASCII; base64 data is "
                                f"A-Z, a-z, 0-9, +, / and =")
        if scheme is None or scheme.group(1).lower() == "file":
            if self.config.media_root is None:
                raise ApiError(400, f"{where}: local paths and file:// URLs are refused (the server was started "
                                    f"without --media-root); send an http(s) URL or a data: URI")
        elif scheme.group(1).lower() not in ("http", "https", "data"):
            raise ApiError(400, f"{where}: unsupported URL scheme {scheme.group(1)!r}; send an http(s) URL or a "
                                f"data: URI")

    def _block(self, part, where: str, pixels: list[int]) -> dict:
        if part.type == "text":
            return {"type": "text", "text": part.text}
        url = (part.image_url if part.type == "image_url" else part.video_url).url
        if part.type == "image_url":
            return {"type": "image", "image": self._image(url, where, pixels)}
        from ..io.video import TooManyFrames, load_video
        try:
            video = load_video(url, self._frames_asked(part.video_url), policy=self.policy,
                               max_frames=self.limits.max_video_frames, max_pixels_per_frame=self.limits.max_image_pixels)
            return {"type": "video", "video": video}
        except TooManyFrames as err:
            raise ApiError(400, f"{where}: {err} (this server's limit per video: --max-video-frames)") from None
        except TooManyPixels as err:
            raise ApiError(400, f"{where}: {err} (this server's limit per frame: --max-image-pixels)") from None
        except (MediaError, ValueError) as err:  # ValueError: input the reader refused with Python's own error
            raise ApiError(400, f"{where}: {err}") from None

    def _frames_asked(self, video_url) -> int | None:
        """The frames to sample from a video: its num_frames, else the server's default (--video-frames); frames
        sent as they are (a data: URI of frames) are used as they are unless num_frames asks for fewer, as
        transformers' processor takes a frames array (None: every frame)."""
        from ..io.video import is_frames_uri
        if video_url.num_frames or is_frames_uri(video_url.url):
            return video_url.num_frames
        return self._default_frames

    def _image(self, url: str, where: str, pixels: list[int]):
        """Load one image; the request's images together may have at most --max-request-pixels pixels, which
        is checked from each image's header before it is decoded."""
        limit = self.limits.max_request_pixels
        remaining = max(limit - pixels[0], 0)
        policy = self.policy if remaining >= self.policy.max_pixels else replace(self.policy, max_pixels=remaining)
        try:
            image = load_image(url, policy, on_white=True)  # transparency as vLLM shows it
        except TooManyPixels as err:
            if policy is not self.policy:
                raise ApiError(400, f"{where}: the request's images have more than {limit} pixels in all (width x "
                                    f"height summed; --max-request-pixels); send fewer or smaller images") from None
            raise ApiError(400, f"{where}: {err} (this server's limit per image: --max-image-pixels)") from None
        except (MediaError, ValueError) as err:  # ValueError: input the reader refused with Python's own error
            raise ApiError(400, f"{where}: {err}") from None
        pixels[0] += image.width * image.height
        return image
