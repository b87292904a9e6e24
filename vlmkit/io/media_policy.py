"""``MediaPolicy``: the limits that apply while media is loaded (file confinement, byte and pixel caps,
timeouts, redirects, private network addresses), shared by the loaders (media.py, video.py) and the
HTTP client that enforces the network part (net.py)."""

from __future__ import annotations

from dataclasses import dataclass

_MiB = 1024 * 1024


@dataclass(frozen=True)
class MediaPolicy:
    """Limits applied while loading media. The defaults suit a trusted local user; see `server_default`.

    timeout_s is the wall-clock budget of a whole fetch: connect, every redirect hop and the body.
    """

    timeout_s: float = 10.0
    max_bytes: int = 20 * _MiB
    max_pixels: int = 64 * 1024 * 1024
    max_redirects: int = 3
    allow_local_files: bool = True
    media_root: str | None = None
    allow_private_hosts: bool = True
    allowed_hosts: tuple[str, ...] = ()

    @classmethod
    def server_default(cls) -> MediaPolicy:
        """The policy for a network server: no local files, no private/loopback/link-local/reserved hosts."""
        return cls(allow_local_files=False, allow_private_hosts=False)
