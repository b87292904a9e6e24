"""The web playground at / of ``vlmkit serve``: served (or not, with --no-playground) as plain files under
a strict content security policy, and driven in a real browser (Playwright with the system's chromium)
against the built-in model: a picture and a question typed as a person would, streamed answers equal
to the API's greedy ones, partial previews then the picture, markup kept as text, server errors shown,
no console errors and no request to any host but the server's.

Screenshots are kept under $VLMKIT_TEST_ARTIFACTS (else a temporary folder printed in the output)."""

import base64
import os
import shutil
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from serve_support import image_part, serve, user

from vlmkit.builtin import builtin_model_path
from vlmkit.serve.config import config_from_args
from vlmkit.serve.pages import PLAYGROUND_DIR

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "a_blue_triangle_on_the_right.png"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def server():
    with serve(builtin_model_path()) as running:
        yield running


# --- the files, without a browser ----------------------------------------------------------------
def test_the_page_and_its_files_are_served_under_a_strict_content_security_policy(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "script-src 'self'" in policy
    for path, kind in [("/playground/app.js", "text/javascript"), ("/playground/style.css", "text/css")]:
        response = httpx.get(server.url + path)
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
    info = httpx.get(server.url + "/playground/info").json()
    assert info == {"ready": True, "model": server.config.model_name, "can_generate_images": True,
                    "api_key_required": False}


def test_the_page_names_no_other_host_and_never_parses_text_as_html():
    text = "".join((PLAYGROUND_DIR / name).read_text() for name in ("index.html", "app.js", "style.css"))
    assert "http://" not in text and "https://" not in text and "//" + "cdn" not in text
    assert "innerHTML" not in text and "insertAdjacentHTML" not in text and "eval(" not in text


def test_no_playground_turns_the_page_off():
    with serve(builtin_model_path(), playground=False) as plain:
        assert httpx.get(plain.url + "/").status_code == 404
        assert httpx.get(plain.url + "/playground/app.js").status_code == 404


def test_the_no_playground_flag_reaches_the_config():
    from vlmkit.cli import build_parser
    args = build_parser().parse_args(["serve", "--no-playground"])
    assert config_from_args(args).playground is False
    assert config_from_args(build_parser().parse_args(["serve"])).playground is True


# --- in a browser --------------------------------------------------------------------------------
def _chromium() -> str:
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    pytest.skip(f"no chromium at {CHROMIUM} (install it: apt-get install -y chromium)")


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("VLMKIT_TEST_ARTIFACTS") or tmp_path_factory.mktemp("playground_screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nplayground screenshots: {folder}")
    return folder


class Watched:
    """A page whose console errors, uncaught errors, dialogs and requests to other hosts are recorded
    (requests to other hosts are also blocked)."""

    def __init__(self, context):
        self.context, self.problems, self.outside = context, [], []
        context.route("**/*", self._route)
        self.page = context.new_page()
        self.page.on("console", lambda m: m.type == "error" and self.problems.append(f"console: {m.text}"))
        self.page.on("pageerror", lambda err: self.problems.append(f"page error: {err}"))
        self.page.on("dialog", lambda d: (self.problems.append(f"dialog: {d.message}"), d.dismiss()))

    def _route(self, route):
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            self.outside.append(route.request.url)
            route.abort()


@pytest.fixture
def watched(browser, server, artifacts, request):
    context = browser.new_context(viewport={"width": 1100, "height": 720})
    watch = Watched(context)
    watch.page.goto(server.url + "/")
    watch.page.wait_for_selector("#model:text('builtin_model')")
    yield watch
    watch.page.screenshot(path=str(artifacts / f"{request.node.name}.png"))
    context.close()
    assert watch.problems == [] and watch.outside == []


def _ask(page, question: str) -> str:
    """Type a question as a person would and return the streamed answer once it has finished."""
    answers = page.locator(".message.assistant[data-done]").count()
    page.click("#prompt")
    page.keyboard.type(question)
    page.keyboard.press("Enter")
    page.wait_for_selector(f".message.assistant[data-done] >> nth={answers}")
    return page.locator(".message.assistant span").nth(answers).text_content()


def test_a_question_about_an_uploaded_picture_gets_the_models_answer_over_several_turns(watched, server):
    page = watched.page
    page.set_input_files("#file", str(EXAMPLE))
    page.wait_for_selector("#attachments img")
    first = _ask(page, "What is in this image?")
    picture = image_part("data:image/png;base64," + base64.b64encode(EXAMPLE.read_bytes()).decode())
    messages = user(picture, "What is in this image?")
    expected = server.chat(messages, max_tokens=256).choices[0].message.content
    assert first == expected == "a blue triangle on the right"
    assert page.locator(".message.user img").count() == 1
    second = _ask(page, "What colour is the shape?")
    messages += [{"role": "assistant", "content": first}, *user("What colour is the shape?")]
    assert second == server.chat(messages, max_tokens=256).choices[0].message.content
    page.click("#new-chat")
    assert page.locator(".message").count() == 0


@pytest.mark.parametrize("how", ["drop", "paste"])
def test_a_picture_can_be_dropped_or_pasted(watched, how):
    page = watched.page
    target = "#composer" if how == "drop" else "#prompt"
    payload = base64.b64encode(EXAMPLE.read_bytes()).decode()
    page.locator(target).evaluate(
        """(element, [how, payload]) => {
             const bytes = Uint8Array.from(atob(payload), (c) => c.charCodeAt(0));
             const files = new DataTransfer();
             files.items.add(new File([bytes], "shape.png", { type: "image/png" }));
             const event = how === "drop" ? new DragEvent("drop", { dataTransfer: files, bubbles: true })
                                          : new ClipboardEvent("paste", { clipboardData: files, bubbles: true });
             element.dispatchEvent(event);
           }""", [how, payload])
    page.wait_for_selector("#attachments img")
    assert _ask(page, "What is in this image?") == "a blue triangle on the right"


def test_stop_ends_the_answer_where_it_is_and_the_server_stops_decoding_it(watched, server, monkeypatch):
    from vlmkit.serve.decoding import TextDecoder
    step = TextDecoder.step

    def slow_step(self):  # a slow model, so the answer is still coming when Stop is pressed
        time.sleep(0.05)
        return step(self)

    monkeypatch.setattr(TextDecoder, "step", slow_step)
    page = watched.page
    cancelled = server.stats()["cancelled"]
    page.fill("#prompt", "<b>x</b>")
    page.click("#send")
    page.wait_for_selector(".message.assistant span:not(:empty)")
    page.click("#stop")
    page.wait_for_selector(".message.assistant[data-done]")
    deadline = time.monotonic() + 10
    while server.stats()["cancelled"] == cancelled and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.stats()["cancelled"] == cancelled + 1
    assert page.locator("#error").is_hidden() and page.is_enabled("#send") and not page.is_enabled("#stop")
    kept = page.locator(".message.assistant span").first.text_content()
    assert 0 < len(kept.split()) < 100  # the answer as far as it got (256 tokens when left to run)


def test_markup_typed_by_the_user_stays_text(watched):
    page = watched.page
    markup = "<b>x</b><img src=x onerror=alert(1)>"
    _ask(page, markup)
    assert page.locator(".message.user span").first.text_content() == markup
    assert page.locator("#messages b, #messages img").count() == 0


def _draw(page, prompt: str, **fields) -> None:
    """Ask the image tab for a picture as a person would: the prompt and the fields given, then Draw."""
    page.click("#tab-images")
    page.fill("#image-prompt", prompt)
    for field, value in fields.items():
        page.fill(f"#{field.replace('_', '-')}", value)
    page.click("#draw")


def test_the_image_tab_shows_partial_previews_then_the_picture_the_api_draws(watched, server):
    page = watched.page
    _draw(page, "a red circle on the left", seed="3")
    page.wait_for_selector("#gallery img[data-final]")
    final = page.locator("#gallery img")
    assert final.get_attribute("data-previews") == "3"
    assert page.locator("#gallery a[download]").get_attribute("href") == final.get_attribute("src")
    drawn = server.openai().images.generate(model=server.config.model_name, prompt="a red circle on the left",
                                            extra_body={"seed": 3}).data[0].b64_json
    assert final.get_attribute("src") == "data:image/png;base64," + drawn


def test_server_errors_are_shown_and_the_api_key_is_sent_once_typed(browser, artifacts):
    with serve(builtin_model_path(), api_key="sesame") as locked:
        context = browser.new_context()
        watch = Watched(context)
        page = watch.page
        page.goto(locked.url + "/")
        page.wait_for_selector("#model:text('builtin_model')")
        page.click("#prompt")
        page.keyboard.type("Hello")
        page.keyboard.press("Enter")
        page.wait_for_selector("#error:visible")
        assert "API key" in page.locator("#error").text_content()
        assert page.locator(".message").count() == 0 and page.input_value("#prompt") == "Hello"  # to send again
        page.fill("#api-key", "sesame")
        answer = _ask(page, " there")
        assert page.locator("#error").is_hidden()
        assert answer == locked.chat(user("Hello there"), max_tokens=256).choices[0].message.content
        assert page.evaluate("sessionStorage.getItem('vlmkit-api-key')") == "sesame"
        page.screenshot(path=str(artifacts / "api_key.png"))
        context.close()
    # the failed request is the page's own 401, which the browser reports on the console
    assert [p for p in watch.problems if "401" not in p] == [] and watch.outside == []


def test_a_screenshot_of_an_answered_picture_is_kept_for_the_docs(watched, artifacts):
    """docs/playground.png is this picture (VLMKIT_UPDATE_DOCS_SCREENSHOT=1 writes it there)."""
    page = watched.page
    page.set_viewport_size({"width": 960, "height": 540})
    page.set_input_files("#file", str(EXAMPLE.with_name("a_cyan_circle_on_the_left_and_a_yellow_square_on_the_right.png")))
    _ask(page, "What is in this image?")
    _ask(page, "How many shapes are there?")
    page.screenshot(path=str(artifacts / "playground.png"))
    if os.environ.get("VLMKIT_UPDATE_DOCS_SCREENSHOT"):
        shutil.copy(artifacts / "playground.png", EXAMPLE.parent.parent / "docs" / "playground.png")


def test_any_temperature_and_guidance_typed_are_sent(watched, server):
    page = watched.page
    with page.expect_request("**/v1/images/generations") as sent:  # neither is a multiple of the old steps
        _draw(page, "a red circle on the left", image_temperature="0.7", guidance="1.25", seed="3")
    body = sent.value.post_data_json
    assert (body["temperature"], body["guidance_scale"]) == (0.7, 1.25)
    page.wait_for_selector("#gallery img[data-final]")


def test_pictures_stopped_or_refused_do_not_stay_drawing(watched, server, monkeypatch):
    from vlmkit.generation import image_step
    draw = image_step.guided_image_token

    def slowly(*args, **kwargs):  # still drawing when Stop is pressed
        time.sleep(0.03)
        return draw(*args, **kwargs)

    monkeypatch.setattr(image_step, "guided_image_token", slowly)
    page = watched.page
    _draw(page, "a big blue square", image_n="2")
    page.wait_for_selector("#gallery img[data-previews]")
    page.click("#stop-drawing")
    page.wait_for_selector("#draw:enabled")
    captions = page.locator("#gallery figcaption span").all_text_contents()
    assert captions and "drawing…" not in captions and "stopped" in captions
    _draw(page, "word " * 5000)  # longer than the model's context: a 400
    page.wait_for_selector("#error:visible")
    assert page.locator("#gallery figure").count() == len(captions)  # the refused request left no figure
    # the refused request is the page's own 400, which the browser reports on the console
    watched.problems[:] = [p for p in watched.problems if "status of 400" not in p]


@pytest.fixture
def slow_answers(monkeypatch):
    """A slow model, so an answer is still coming while the page is used."""
    from vlmkit.serve.decoding import TextDecoder
    step = TextDecoder.step

    def slow_step(self):
        time.sleep(0.05)
        return step(self)

    monkeypatch.setattr(TextDecoder, "step", slow_step)


def _chat_requests(page) -> list:
    """The bodies of the chat requests the page sends from now on, as they are sent."""
    sent = []
    page.on("request", lambda r: r.url.endswith("/v1/chat/completions") and sent.append(r.post_data_json))
    return sent


def test_enter_while_an_answer_streams_sends_nothing_until_it_ends(watched, server, slow_answers):
    """Send is disabled while an answer streams, and so is Enter: one request, whose conversation the next
    question then continues (a second request would have left the first answer out, and unstoppable)."""
    page = watched.page
    sent = _chat_requests(page)
    page.fill("#prompt", "first question")
    page.keyboard.press("Enter")
    page.wait_for_selector(".message.assistant span:not(:empty)")
    page.fill("#prompt", "second question")
    page.keyboard.press("Enter")
    page.click("#stop")
    page.wait_for_selector(".message.assistant[data-done]")
    assert len(sent) == 1 and page.input_value("#prompt") == "second question"
    page.click("#prompt")
    page.keyboard.press("Enter")
    page.wait_for_selector(".message.assistant[data-done] >> nth=1")
    assert [m["role"] for m in sent[1]["messages"]] == ["user", "assistant", "user"]


def test_a_new_chat_during_an_answer_starts_from_nothing(watched, server, slow_answers):
    """New chat while an answer streams stops it; the stopped answer belongs to no conversation, so the new
    chat's first request holds its own question alone."""
    page = watched.page
    sent = _chat_requests(page)
    page.fill("#prompt", "an old question")
    page.keyboard.press("Enter")
    page.wait_for_selector(".message.assistant span:not(:empty)")
    page.click("#new-chat")
    assert page.locator(".message").count() == 0 and page.is_enabled("#send")
    time.sleep(0.3)  # the stopped request's ending, which must not reach the new conversation
    page.fill("#prompt", "a new question")
    page.keyboard.press("Enter")
    page.wait_for_selector(".message.assistant[data-done]")
    assert sent[-1]["messages"] == [{"role": "user", "content": [{"type": "text", "text": "a new question"}]}]


def test_a_seed_past_what_a_javascript_number_holds_is_sent_as_typed(watched, server):
    page = watched.page
    seed = "18446744073709551615"  # 2**64 - 1, the largest seed the API takes
    with page.expect_request("**/v1/images/generations") as sent:
        _draw(page, "a red circle on the left", seed=seed)
    assert f'"seed":{seed}' in sent.value.post_data
    page.wait_for_selector("#gallery img[data-final]")
    assert page.locator("#error").is_hidden()
