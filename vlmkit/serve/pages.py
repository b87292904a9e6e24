"""The playground's routes: the page at ``/``, its script and style sheet, and what the page needs to
know about the served model. The files are plain HTML, CSS and JavaScript shipped in the package
(``playground/``, no build step); the page calls the same OpenAI endpoints as any client, with the
API key the user types. ``--no-playground`` leaves all of this out (``/`` is then a 404)."""

import functools
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

PLAYGROUND_DIR = Path(__file__).parent / "playground"
_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
# the page talks only to this server: no other origin may be reached, framed or run scripts
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                               "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _file(name: str) -> Response:
    return Response(_body(name), media_type=f"{_FILES[name]}; charset=utf-8", headers=_HEADERS)


@functools.cache
def _body(name: str) -> bytes:
    """A playground file, read once per process."""
    return (PLAYGROUND_DIR / name).read_bytes()


def install_playground(app: FastAPI, state) -> None:
    """Add the playground's routes to ``app``; ``state`` is the server's ``ServerState``."""

    @app.get("/", include_in_schema=False)
    async def index():
        return _file("index.html")

    @app.get("/playground/app.js", include_in_schema=False)
    async def script():
        return _file("app.js")

    @app.get("/playground/style.css", include_in_schema=False)
    async def style():
        return _file("style.css")

    @app.get("/playground/info", include_in_schema=False)
    async def info():
        """The served model's name and whether it draws (as /health, this needs no API key)."""
        if state.scheduler is None:
            return JSONResponse({"ready": False}, headers={"Cache-Control": "no-cache"})
        return JSONResponse({"ready": True, "model": state.config.model_name,
                             "can_generate_images": bool(state.engine.can_generate_images),
                             "api_key_required": state.config.api_key is not None},
                            headers={"Cache-Control": "no-cache"})
