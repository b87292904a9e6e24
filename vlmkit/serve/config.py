"""Everything a server (or a batch job built on its request path) is configured with: where to listen,
the API key, the per-request limits and how media may be fetched. One dataclass, and the command-line
flags that fill it."""

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..cli_args import existing_folder, host_list, positive_float, positive_int
from ..io.media import MediaPolicy

_MiB = 1024 * 1024


@dataclass
class ServeLimits:
    """Per-request limits; each is a ``vlmkit serve`` flag and a clear 400 when a request goes over it."""

    max_images: int = 8  # image parts per request
    max_image_pixels: int = 4096 * 4096  # width x height of one image
    max_request_pixels: int = 2 * 4096 * 4096  # width x height summed over a request's images
    max_messages: int = 1024  # messages per chat request
    max_parts: int = 256  # content parts per message
    max_image_bytes: int = 20 * _MiB  # one fetched or inlined image (or video file)
    max_video_frames: int = 32  # frames sampled from one video
    video_frames: int = 8  # frames sampled from a video when the request does not say
    max_body_bytes: int = 32 * _MiB  # request body (base64 images count here)
    max_n: int = 8  # choices per chat request and images per generation request
    default_max_tokens: int = 512  # when a request gives no max_tokens (the context may allow fewer)
    max_stop: int = 4  # stop strings per request, as OpenAI's API


@dataclass
class ServeConfig:
    """A server's settings; ``media_policy()`` derives the fetch policy from them."""

    model: str = ""
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    dtype: str = "auto"
    device: str | None = None
    quantize: str | None = None  # "int8" / "int4": vlmkit's weight-only quantization at load
    limits: ServeLimits = field(default_factory=ServeLimits)
    allow_private_hosts: bool = False
    allowed_hosts: tuple[str, ...] = ()
    media_root: str | None = None
    fetch_timeout_s: float = 10.0
    max_batch_rows: int = 32  # text sequences decoded together
    max_batch_images: int = 8  # images drawn together (each is two rows with guidance)
    max_waiting: int = 256  # requests queued for the model before new ones get a 503
    shutdown_timeout_s: float = 30.0  # how long SIGTERM waits for in-flight requests
    # slow clients: a connection that has not sent a request's headers within header_timeout_s, or its
    # body within body_timeout_s, is closed (408); an idle keep-alive connection after keep_alive_s
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keep_alive_s: int = 5
    max_header_bytes: int = 64 * 1024  # one request's headers (h11's incomplete-event limit)
    docs: bool = False  # serve the interactive API page at /docs (the schema is always at /openapi.json)
    playground: bool = True  # serve the web playground at /

    @property
    def model_name(self) -> str:
        """The id clients send as ``model`` and ``GET /v1/models`` lists."""
        if self.served_model_name:
            return self.served_model_name
        return Path(self.model.rstrip("/")).name or self.model

    def media_policy(self) -> MediaPolicy:
        """``MediaPolicy.server_default()`` opened only as far as the flags say."""
        base = MediaPolicy.server_default()
        return MediaPolicy(timeout_s=self.fetch_timeout_s, max_bytes=self.limits.max_image_bytes,
                           max_pixels=self.limits.max_image_pixels, max_redirects=base.max_redirects,
                           allow_local_files=self.media_root is not None, media_root=self.media_root,
                           allow_private_hosts=self.allow_private_hosts, allowed_hosts=tuple(self.allowed_hosts))


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The limit, media and batching flags (shared by ``vlmkit serve`` and jobs on its request path)."""
    d, limits = ServeConfig(), ServeLimits()
    group = parser.add_argument_group("limits (each over-limit request gets a 400 that names the limit)")
    group.add_argument("--max-images", type=positive_int, default=limits.max_images, help="image parts per request")
    group.add_argument("--max-image-pixels", type=positive_int, default=limits.max_image_pixels,
                       help="width x height of one image")
    group.add_argument("--max-request-pixels", type=positive_int, default=limits.max_request_pixels,
                       help="width x height summed over a request's images")
    group.add_argument("--max-messages", type=positive_int, default=limits.max_messages, help="messages per chat request")
    group.add_argument("--max-parts", type=positive_int, default=limits.max_parts, help="content parts per message")
    group.add_argument("--max-image-bytes", type=positive_int, default=limits.max_image_bytes,
                       help="bytes of one image or video")
    group.add_argument("--max-video-frames", type=positive_int, default=limits.max_video_frames,
                       help="frames sampled from one video")
    group.add_argument("--video-frames", type=positive_int, default=limits.video_frames,
                       help="frames sampled from a video whose request names no number")
    group.add_argument("--max-body-bytes", type=positive_int, default=limits.max_body_bytes, help="request body size")
    group.add_argument("--max-n", type=positive_int, default=limits.max_n, help="choices (or images) per request")
    group.add_argument("--default-max-tokens", type=positive_int, default=limits.default_max_tokens,
                       help="answer length when a request gives no max_tokens")
    media = parser.add_argument_group("media fetching (private addresses and local files are refused by default)")
    media.add_argument("--allow-private-hosts", action="store_true",
                       help="let image URLs reach private, loopback and link-local addresses")
    media.add_argument("--allowed-hosts", type=host_list, default="",
                       help="comma-separated host names, IPs or CIDRs that image URLs may reach even if private")
    media.add_argument("--media-root", type=existing_folder,
                       help="serve local paths and file:// URLs, confined to this folder")
    media.add_argument("--fetch-timeout", type=positive_float, default=d.fetch_timeout_s, help="seconds per image fetch")
    batching = parser.add_argument_group("batching")
    batching.add_argument("--max-batch-rows", type=positive_int, default=d.max_batch_rows,
                          help="text sequences decoded together")
    batching.add_argument("--max-batch-images", type=positive_int, default=d.max_batch_images,
                          help="images generated together")
    batching.add_argument("--max-waiting", type=positive_int, default=d.max_waiting,
                          help="queued requests before new ones are refused with 503")


def add_http_arguments(parser: argparse.ArgumentParser) -> None:
    """The HTTP server's flags: timeouts for slow clients and the API docs page (``vlmkit serve`` only)."""
    d = ServeConfig()
    http = parser.add_argument_group("HTTP (slow clients are cut off; the OpenAPI schema is at /openapi.json)")
    http.add_argument("--header-timeout", type=positive_float, default=d.header_timeout_s,
                      help="seconds a client has to send a request's headers before the connection is closed")
    http.add_argument("--body-timeout", type=positive_float, default=d.body_timeout_s,
                      help="seconds a client has to send a request's body (else 408)")
    http.add_argument("--keep-alive-timeout", type=positive_int, default=d.keep_alive_s,
                      help="seconds an idle keep-alive connection stays open")
    http.add_argument("--max-header-bytes", type=positive_int, default=d.max_header_bytes,
                      help="size of one request's headers (larger: 400)")
    http.add_argument("--docs", action="store_true", help="serve the interactive API page at /docs")
    http.add_argument("--no-playground", action="store_true", help="do not serve the web playground at /")


def config_from_args(args) -> ServeConfig:
    """A ``ServeConfig`` from parsed ``vlmkit serve`` arguments (the API key also from $VLMKIT_API_KEY)."""
    limits = ServeLimits(max_images=args.max_images, max_image_pixels=args.max_image_pixels,
                         max_request_pixels=args.max_request_pixels, max_messages=args.max_messages,
                         max_parts=args.max_parts,
                         max_image_bytes=args.max_image_bytes, max_video_frames=args.max_video_frames,
                         video_frames=args.video_frames, max_body_bytes=args.max_body_bytes, max_n=args.max_n,
                         default_max_tokens=args.default_max_tokens)
    return ServeConfig(model=args.model, served_model_name=getattr(args, "served_model_name", None),
                       host=getattr(args, "host", "127.0.0.1"), port=getattr(args, "port", 8000),
                       api_key=getattr(args, "api_key", None) or os.environ.get("VLMKIT_API_KEY") or None,
                       dtype=args.dtype, device=args.device, quantize=getattr(args, "quantize", None),
                       limits=limits,
                       allow_private_hosts=args.allow_private_hosts,
                       allowed_hosts=tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip()),
                       media_root=args.media_root, fetch_timeout_s=args.fetch_timeout,
                       max_batch_rows=args.max_batch_rows, max_batch_images=args.max_batch_images,
                       max_waiting=args.max_waiting,
                       shutdown_timeout_s=getattr(args, "shutdown_timeout", ServeConfig.shutdown_timeout_s),
                       header_timeout_s=getattr(args, "header_timeout", ServeConfig.header_timeout_s),
                       body_timeout_s=getattr(args, "body_timeout", ServeConfig.body_timeout_s),
                       keep_alive_s=getattr(args, "keep_alive_timeout", ServeConfig.keep_alive_s),
                       max_header_bytes=getattr(args, "max_header_bytes", ServeConfig.max_header_bytes),
                       docs=getattr(args, "docs", False), playground=not getattr(args, "no_playground", False))
