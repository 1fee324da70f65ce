"""The web playground at ``/``, driven in a real browser (tests/browser.py) against real servers.

Two ``sdgate serve`` processes for the whole module: an open one offering ``tiny`` (the default:
random weights, the fastest) and ``demo`` (for the README's screenshot, where a picture should show
something), and one that requires API keys. Each test opens its own browser context (fresh
storage), finds the jobs it made by their ids (from the page's own POST), and checks what it can
through the API too. An uncaught error in a page, or a console error its test did not expect
(a Content-Security-Policy violation, say), fails the test.

Screenshots of the states go to ``build/test-artifacts/playground/`` (``SDGATE_TEST_ARTIFACTS``
moves them); ``playground.png`` is the README's.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

from tests import background
from tests.apikeys import create_key
from tests.browser import Browser, Page, Pages, Response, chromium, expect, screenshot
from tests.server import ServerProcess, start_server, with_tiny_models

WAIT_MS = 60_000
"""How long to wait for what the server does (generous: the suite shares two cores)."""
OPEN_ENV = {"SDGATE_MODELS": "tiny,demo", "SDGATE_MAX_BATCH_WAIT_MS": "0"}
SECURED_ENV = {"SDGATE_AUTH": "on", "SDGATE_MAX_BATCH_WAIT_MS": "0"}
SMALL = {"width": "64", "height": "64", "num_inference_steps": "2"}
"""The quickest request (form field → value), for tests about anything but the image itself."""
TINY_DEFAULT_STEPS = "4"
KEY_STORAGE = "sdgate.apiKey"
"""The page's localStorage item for the key (playground.js)."""


@dataclass
class Secured:
    server: ServerProcess
    key: str


def _open_server() -> ServerProcess:
    data_dir = with_tiny_models(background.workdir("playground") / "data")
    return start_server(data_dir, env=OPEN_ENV, model=None)


def _secured_server() -> Secured:
    data_dir = with_tiny_models(background.workdir("playground-secured") / "data")
    key = create_key(data_dir, "playground")
    return Secured(start_server(data_dir, env=SECURED_ENV), key)


background.needs(__file__, playground_open=_open_server, playground_secured=_secured_server)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as b:
        yield b


# The servers' fixtures ask for the browser first: without one the tests skip before any server starts.
@pytest.fixture(scope="module")
def site(browser: Browser) -> Iterator[ServerProcess]:
    """The open server (made while the modules before this one ran: tests/background.py)."""
    srv: ServerProcess = background.take("playground_open", _open_server)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def secured(browser: Browser) -> Iterator[Secured]:
    """The server that requires a key, and a key it takes."""
    made: Secured = background.take("playground_secured", _secured_server)
    yield made
    made.server.stop()


@pytest.fixture
def pages(browser: Browser) -> Iterator[Pages]:
    """Pages for this test; its teardown fails the test on an uncaught page error."""
    opened = Pages(browser)
    yield opened
    opened.close()


# -- helpers ---------------------------------------------------------------------------------------


def open_playground(pages: Pages, url: str, **context: Any) -> Page:
    """The playground at ``url`` in a fresh context, once it has loaded its models, LoRAs and gallery."""
    page = pages.new_page(**context)
    page.goto(url + "/")
    expect(page.locator("body")).to_have_attribute("data-ready", "true", timeout=WAIT_MS)
    return page


def fill(page: Page, **fields: str) -> None:
    """Type into the form's fields, by id."""
    for name, value in fields.items():
        page.fill(f"#{name}", value)


def is_generation_post(response: Response) -> bool:
    return response.request.method == "POST" and urlsplit(response.url).path == "/v1/generations"


def submit(page: Page, action: Callable[[], None], status: int = 202) -> Response:
    """Run ``action`` (a click, a key press) and return the answer to the generation POST it sent."""
    with page.expect_response(is_generation_post, timeout=WAIT_MS) as answer:
        action()
    response = answer.value
    assert response.status == status, f"{response.status} {response.text()}"
    return response


def generate(page: Page, action: Callable[[], None] | None = None) -> str:
    """Submit the form (by ``action``, else a click on Generate), wait until the page says it is done;
    the job's id."""
    response = submit(page, action or (lambda: page.click("#generate")))
    job_id = response.json()["id"]
    assert isinstance(job_id, str)
    wait_done(page)
    return job_id


def wait_done(page: Page) -> None:
    # "Sending…" replaced the previous job's status before the POST went out: this is the new one's.
    expect(page.locator("#status")).to_have_text(re.compile(r"^Done in "), timeout=WAIT_MS)


def natural_size(page: Page, selector: str) -> tuple[int, int]:
    """The intrinsic size of the image at ``selector``, once it has loaded."""
    image = page.locator(selector)
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle(), timeout=WAIT_MS)
    width, height = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    return int(width), int(height)


def api_job(srv: ServerProcess, job_id: str, key: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else None
    resp = httpx.get(f"{srv.url}/v1/jobs/{job_id}", headers=headers, timeout=30)
    assert resp.status_code == 200, resp.text
    job: dict[str, Any] = resp.json()
    return job


def download(url: str) -> Image.Image:
    resp = httpx.get(url, timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("image/"), resp.headers
    return Image.open(io.BytesIO(resp.content))


def noise_png(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """A PNG with every pixel its own, so that comparing areas of it means something."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB").save(path)
    return path


def luminance(css_color: str) -> float:
    """0 (black) to 1 (white), of a computed ``rgb(r, g, b)``."""
    r, g, b = (int(v) for v in re.findall(r"\d+", css_color)[:3])
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255


# Records every state of the progress bar, the preview and the results in order, as they change:
# a step or a preview may last less than any poll would catch.
RECORD_STATES = """() => {
  const log = [];
  window.playgroundLog = log;
  const bar = document.getElementById("progress");
  const preview = document.getElementById("preview");
  const results = document.getElementById("results");
  const step = () => ({kind: "progress", value: bar.getAttribute("value"), max: bar.getAttribute("max")});
  new MutationObserver(() => log.push(step())).observe(bar, {attributes: true, attributeFilter: ["value", "max"]});
  new MutationObserver(() => log.push({kind: "preview", src: preview.getAttribute("src") || ""}))
    .observe(preview, {attributes: true, attributeFilter: ["src"]});
  new MutationObserver(() => { if (results.querySelector("img")) log.push({kind: "result"}); })
    .observe(results, {childList: true, subtree: true});
}"""


# -- the tests -------------------------------------------------------------------------------------


def test_page_errors_fail_the_test(browser: Browser) -> None:
    """The helper that fails a test on page errors does catch them: a throw, an unhandled rejection,
    a console error not declared; and lets a declared console error through."""
    pages = Pages(browser)
    page = pages.new_page()
    page.set_content(
        "<script>setTimeout(() => { throw new Error('boom') }); Promise.reject(new Error('nope'));</script>"
    )
    # A task queued after the throw's: once it has run, the errors have been reported (in order).
    page.evaluate("() => new Promise((resolve) => setTimeout(resolve))")
    with pytest.raises(pytest.fail.Exception, match=r"(?s)boom.*nope"):
        pages.close()

    page = pages.new_page(allow_console=[r"^expected "])
    page.evaluate("console.error('expected trouble'); console.error('surprise')")
    with pytest.raises(pytest.fail.Exception, match="surprise") as failed:
        pages.close()
    assert "expected trouble" not in str(failed.value)


def test_generate_button_and_ctrl_enter_submit_the_prompt(site: ServerProcess, pages: Pages) -> None:
    """A prompt typed and Generate pressed makes a job of that prompt and shows its image; Ctrl+Enter
    in the prompt does the same."""
    page = open_playground(pages, site.url)
    fill(page, **SMALL, prompt="a lighthouse at dusk, by button")
    job_id = generate(page)
    job = api_job(site, job_id)
    assert job["status"] == "succeeded"
    assert job["params"]["prompt"] == "a lighthouse at dusk, by button"
    expect(page.locator("#results figure")).to_have_count(1)
    expect(page.locator("#results img")).to_have_attribute("src", job["images"][0]["url"])
    expect(page.locator("#generate")).to_be_enabled()
    expect(page.locator("#cancel")).to_be_disabled()

    fill(page, prompt="a lighthouse at dusk, by keyboard")
    job_id = generate(page, lambda: page.press("#prompt", "Control+Enter"))
    job = api_job(site, job_id)
    assert job["params"]["prompt"] == "a lighthouse at dusk, by keyboard"
    expect(page.locator("#results img")).to_have_attribute("src", job["images"][0]["url"])


def test_progress_moves_and_a_preview_shows_before_the_result(site: ServerProcess, pages: Pages) -> None:
    """While a job runs the progress bar goes through intermediate steps and a live preview (a JPEG
    data URL) appears, both before the final image."""
    page = open_playground(pages, site.url)
    # 20 steps: previews come every 5 (SDGATE_PREVIEW_EVERY); 256x256 makes each step long enough to see.
    fill(page, prompt="a slow sunrise", width="256", height="256", num_inference_steps="20")
    page.evaluate(RECORD_STATES)
    generate(page)
    log: list[dict[str, str]] = page.evaluate("window.playgroundLog")

    kinds = [entry["kind"] for entry in log]
    assert "result" in kinds, log
    before = log[: kinds.index("result")]
    steps = [
        (float(e["value"]), float(e["max"]))
        for e in before
        if e["kind"] == "progress" and e["value"] is not None and e["max"] is not None
    ]
    intermediate = [(v, m) for v, m in steps if 0 < v < m]
    assert intermediate, f"no step between 0 and the end before the result: {steps}"
    assert {m for _, m in intermediate} == {20}, steps
    previews = [e["src"] for e in before if e["kind"] == "preview"]
    assert previews, f"no preview before the result: {kinds}"
    prefix = "data:image/jpeg;base64,"
    assert all(src.startswith(prefix) for src in previews), [src[:40] for src in previews]
    assert Image.open(io.BytesIO(base64.b64decode(previews[0][len(prefix) :]))).format == "JPEG"
    # Once done, the preview gives way to the image.
    expect(page.locator("#preview")).to_be_hidden()
    expect(page.locator("#results img")).to_be_visible()


def test_the_final_image_has_the_requested_size_and_its_links_work(site: ServerProcess, pages: Pages) -> None:
    """The result loads in the page at the width and height asked for; its share URL is the image's
    own URL, and fetching it gives that image; "Use as input" makes it the image to start from."""
    page = open_playground(pages, site.url)
    fill(page, prompt="a tall narrow window", width="64", height="96", num_inference_steps="2")
    generate(page)
    assert natural_size(page, "#results figure img") == (64, 96)
    src = page.locator("#results figure img").get_attribute("src")
    share = page.locator("#results .share input").input_value()
    assert src and share == src
    assert share.startswith(site.url + "/images/"), share
    assert download(share).size == (64, 96)
    expect(page.locator("#results .params")).to_contain_text("64\N{MULTIPLICATION SIGN}96")
    screenshot(page, "02-done")

    page.click("#results .use")
    expect(page.locator("#editor")).to_be_visible()
    assert natural_size(page, "#input-preview") == (64, 96)
    expect(page.locator("#width")).to_have_value("64")
    expect(page.locator("#height")).to_have_value("96")


def test_cancel_stops_a_long_job(site: ServerProcess, pages: Pages) -> None:
    """Cancel, pressed while a long job runs, stops it: the page says Canceled, the API says canceled,
    and the gallery lists it so."""
    page = open_playground(pages, site.url)
    # Over a minute of work if nothing stopped it.
    fill(page, prompt="a very long exposure", width="512", height="512", num_inference_steps="150")
    response = submit(page, lambda: page.click("#generate"))
    job_id = response.json()["id"]
    # The first preview (step 5) shows the job is well under way.
    expect(page.locator("#preview")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#status")).to_have_text(re.compile(r"^Step \d+ of 150"))
    screenshot(page, "01-generating")
    page.click("#cancel")
    expect(page.locator("#status")).to_have_text("Canceled.", timeout=WAIT_MS)
    job = api_job(site, job_id)
    assert job["status"] == "canceled", job
    assert job["images"] == []
    assert job["progress"]["step"] < 150, job["progress"]
    expect(page.locator("#generate")).to_be_enabled()
    expect(page.locator("#cancel")).to_be_disabled()
    expect(page.locator("#preview")).to_be_hidden()
    expect(page.locator(f'#gallery button[data-job="{job_id}"]')).to_contain_text("canceled", timeout=WAIT_MS)
    screenshot(page, "03-canceled")


def test_image_to_image_from_an_uploaded_file(site: ServerProcess, pages: Pages, tmp_path: Path) -> None:
    """An uploaded image shows in the editor and sets the size; the job is image-to-image with the
    strength set on the slider."""
    page = open_playground(pages, site.url)
    page.set_input_files("#image-file", noise_png(tmp_path / "input.png", 96, 64))
    expect(page.locator("#editor")).to_be_visible()
    assert natural_size(page, "#input-preview") == (96, 64)
    expect(page.locator("#width")).to_have_value("96")
    expect(page.locator("#height")).to_have_value("64")
    # The slider by keyboard, as a person might: 0.80 down four steps of 0.05.
    page.focus("#strength")
    for _ in range(4):
        page.keyboard.press("ArrowLeft")
    expect(page.locator("#strength-value")).to_have_text("0.60")
    fill(page, prompt="the same, but autumn", num_inference_steps="2")
    job_id = generate(page)

    params = api_job(site, job_id)["params"]
    assert params["mode"] == "img2img"
    assert params["strength"] == pytest.approx(0.6)
    assert (params["width"], params["height"]) == (96, 64)
    expect(page.locator("#results .params")).to_contain_text("img2img, strength 0.6")
    assert natural_size(page, "#results figure img") == (96, 64)
    screenshot(page, "04-img2img")


def test_inpainting_changes_only_the_painted_part(site: ServerProcess, pages: Pages, tmp_path: Path) -> None:
    """A mask painted with the mouse makes an inpainting job; the result keeps the input exactly
    where nothing was painted (the server pastes the original back there) and changes the stroke."""
    side = 128
    source = noise_png(tmp_path / "input.png", side, side, seed=1)
    page = open_playground(pages, site.url)
    page.set_input_files("#image-file", source)
    expect(page.locator("#editor")).to_be_visible()
    expect(page.locator("#brush")).to_be_disabled()  # the mask tools wait for the mask to be on
    page.check("#mask-on")
    expect(page.locator("#brush")).to_be_enabled()

    # One horizontal stroke at y=100 with the 32-pixel brush (the canvas is in the image's pixels):
    # it paints rows 84..116; rows 0..63 stay unpainted.
    box = page.locator("#mask-canvas").bounding_box()
    assert box is not None and box["width"] > 0
    scale_x, scale_y = box["width"] / side, box["height"] / side

    def at(x: float, y: float) -> tuple[float, float]:
        return box["x"] + x * scale_x, box["y"] + y * scale_y

    page.mouse.move(*at(16, 100))
    page.mouse.down()
    page.mouse.move(*at(112, 100), steps=8)
    page.mouse.up()
    screenshot(page, "05-inpaint-mask")

    # PNG: a lossless result, so that "kept" can be checked exactly.
    page.select_option("#output_format", "png")
    fill(page, prompt="a bright stripe", num_inference_steps="2")
    job_id = generate(page)

    job = api_job(site, job_id)
    assert job["params"]["mode"] == "inpaint"
    got = np.asarray(download(job["images"][0]["url"]).convert("RGB"))
    sent = np.asarray(Image.open(source).convert("RGB"))
    assert got.shape == sent.shape == (side, side, 3)
    assert np.array_equal(got[:64], sent[:64]), "the unpainted rows changed"
    # Inside the stroke, away from its soft edges.
    changed = np.any(got[92:108, 24:104] != sent[92:108, 24:104], axis=-1)
    assert changed.mean() > 0.5, f"only {changed.mean():.0%} of the painted pixels changed"


def test_the_gallery_gives_a_jobs_parameters_back_after_a_reload(site: ServerProcess, pages: Pages) -> None:
    """After a reload the job is in the gallery; clicking it puts its prompt, seed and steps back in
    the form and its image in the result."""
    page = open_playground(pages, site.url)
    prompt = "a gallery of one: the harbour at night"
    fill(page, prompt=prompt, seed="4242", width="64", height="64", num_inference_steps="3")
    job_id = generate(page)

    page.reload()
    expect(page.locator("body")).to_have_attribute("data-ready", "true", timeout=WAIT_MS)
    # Other values in the form first (a browser may restore fields on reload): the click must set them.
    fill(page, prompt="something else", seed="1", num_inference_steps=TINY_DEFAULT_STEPS, width="512")
    item = page.locator(f'#gallery button[data-job="{job_id}"]')
    expect(item).to_contain_text(prompt)
    item.click()
    expect(page.locator("#prompt")).to_have_value(prompt)
    expect(page.locator("#seed")).to_have_value("4242")
    expect(page.locator("#num_inference_steps")).to_have_value("3")
    expect(page.locator("#width")).to_have_value("64")
    expect(page.locator("#status")).to_contain_text(job_id)
    expect(page.locator("#results img")).to_have_attribute("src", api_job(site, job_id)["images"][0]["url"])
    screenshot(page, "06-gallery")


def test_a_server_with_keys_asks_for_one_and_keeps_it(secured: Secured, pages: Pages) -> None:
    """With keys required the page asks for one on load; a wrong key gets a plain message that
    names the key; the right one opens the page, stays across a reload and generates."""
    srv = secured.server
    # The browser logs each refused request itself; the page handles them.
    page = pages.new_page(allow_console=[r"status of 401"])
    page.goto(srv.url + "/")
    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#key-why")).to_contain_text("needs an API key")
    screenshot(page, "07-key-dialog", full_page=False)

    page.fill("#api-key", "sdg_this-is-not-a-key")
    page.click("#key-form button[type=submit]")
    error = page.locator("#key-error")
    expect(error).to_be_visible(timeout=WAIT_MS)
    expect(dialog).to_be_visible()
    text = error.inner_text()
    assert "API key" in text, text
    assert not re.search(r"Traceback|Error:|\bat \S+:\d+|undefined|\[object", text), text
    expect(page.locator("body")).not_to_have_attribute("data-ready", "true")
    screenshot(page, "07-key-wrong", full_page=False)

    page.fill("#api-key", secured.key)
    page.click("#key-form button[type=submit]")
    expect(page.locator("body")).to_have_attribute("data-ready", "true", timeout=WAIT_MS)
    expect(dialog).to_be_hidden()
    expect(page.locator("#model option[value=tiny]")).to_have_count(1)
    expect(page.locator("#message")).to_be_hidden()
    assert page.evaluate(f"localStorage.getItem({KEY_STORAGE!r})") == secured.key

    page.reload()
    expect(page.locator("body")).to_have_attribute("data-ready", "true", timeout=WAIT_MS)
    expect(dialog).to_be_hidden()
    expect(page.locator("#key-button")).to_be_visible()  # to change or forget the key

    fill(page, **SMALL, prompt="a locked door")
    job_id = generate(page)
    assert api_job(srv, job_id, secured.key)["status"] == "succeeded"
    # The key was what let it through.
    assert httpx.get(f"{srv.url}/v1/jobs/{job_id}", timeout=30).status_code == 401


def test_nothing_scrolls_sideways_on_a_phone(site: ServerProcess, pages: Pages, tmp_path: Path) -> None:
    """At a phone's width, with a wide input image and its result on the page, the page is no wider
    than the screen."""
    phone = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2, "is_mobile": True, "has_touch": True}
    page = open_playground(pages, site.url, **phone)
    page.set_input_files("#image-file", noise_png(tmp_path / "wide.png", 640, 256))
    expect(page.locator("#editor")).to_be_visible()
    fill(page, prompt="a panorama of the bay", num_inference_steps="2")
    generate(page, lambda: page.locator("#generate").tap())
    assert natural_size(page, "#results figure img") == (640, 256)

    screenshot(page, "08-phone")  # first: a page too wide is what the picture should show
    widths = page.evaluate(
        """() => [document.documentElement, document.body].map(
             (el) => ({scroll: el.scrollWidth, client: el.clientWidth}))"""
    )
    # What sticks out, named in the failure: the innermost elements past the right edge.
    beyond = page.evaluate(
        """() => [...document.querySelectorAll("body *")]
             .filter((el) => el.getBoundingClientRect().right > document.documentElement.clientWidth + 0.5)
             .filter((el, _, all) => !all.some((other) => other !== el && el.contains(other)))
             .slice(0, 5)
             .map((el) => `${el.tagName.toLowerCase()}#${el.id}.${el.className}`
                  + ` (right edge ${Math.round(el.getBoundingClientRect().right)} px)`)"""
    )
    for name, w in zip(("html", "body"), widths, strict=True):
        assert w["scroll"] <= w["client"], (
            f"{name} is {w['scroll']} px wide in a {w['client']} px viewport; past the edge: {beyond}"
        )


def test_a_refused_request_shows_the_servers_message(site: ServerProcess, pages: Pages) -> None:
    """A width the API refuses (not a multiple of 8) gets the server's own message, on the field."""
    page = open_playground(pages, site.url, allow_console=[r"status of 422"])
    fill(page, prompt="a crooked frame", width="70", height="64", num_inference_steps="2")
    submit(page, lambda: page.click("#generate"), status=422)
    message = page.locator("#message")
    expect(message).to_be_visible()
    expect(message).to_contain_text("multiple of 8")
    expect(message).to_contain_text("70")
    expect(page.locator("#width")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#status")).to_have_text("Not started.")
    expect(page.locator("#generate")).to_be_enabled()
    screenshot(page, "09-bad-request")


def test_an_empty_prompt_is_caught_before_any_request(site: ServerProcess, pages: Pages) -> None:
    """Generate with no prompt says what is missing and sends nothing."""
    page = open_playground(pages, site.url)
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    page.click("#generate")
    expect(page.locator("#message")).to_contain_text("Write a prompt first")
    expect(page.locator("#prompt")).to_have_attribute("aria-invalid", "true")
    assert posts == []


def test_light_and_dark_themes_follow_the_system(site: ServerProcess, pages: Pages) -> None:
    """The page is light under a light system theme and dark under a dark one."""
    page = open_playground(pages, site.url, color_scheme="light")

    def colors() -> tuple[float, float]:
        style = "() => { const s = getComputedStyle(document.body); return [s.backgroundColor, s.color] }"
        bg, fg = page.evaluate(style)
        return luminance(bg), luminance(fg)

    background_light, text_light = colors()
    assert background_light > 0.8 and text_light < 0.2, (background_light, text_light)
    screenshot(page, "10-light", full_page=False)
    page.emulate_media(color_scheme="dark")
    background_dark, text_dark = colors()
    assert background_dark < 0.2 and text_dark > 0.8, (background_dark, text_dark)
    screenshot(page, "10-dark", full_page=False)


def test_the_demo_model_draws_its_prompt_for_the_readme(site: ServerProcess, pages: Pages) -> None:
    """Choosing the demo model gives the form its defaults (64x64, 20 steps); four images of a red
    circle on blue come back. Its screenshot is the README's (playground.png)."""
    page = open_playground(pages, site.url)
    page.select_option("#model", "demo")
    expect(page.locator("#width")).to_have_value("64")
    expect(page.locator("#height")).to_have_value("64")
    expect(page.locator("#num_inference_steps")).to_have_value("20")
    fill(page, prompt="a red circle on a blue background", seed="42", num_images="4")
    job_id = generate(page)
    job = api_job(site, job_id)
    assert job["model"] == "demo"
    assert [image["seed"] for image in job["images"]] == [42, 43, 44, 45]
    expect(page.locator("#results figure")).to_have_count(4)
    for i in range(4):
        assert natural_size(page, f"#results figure:nth-of-type({i + 1}) img") == (64, 64)
    # The demo draws what it is told: its first image is mostly blue with a red patch.
    rgb = np.asarray(download(job["images"][0]["url"]).convert("RGB")).astype(int)
    red = (rgb[..., 0] > 150) & (rgb[..., 2] < 100)
    blue = (rgb[..., 2] > 150) & (rgb[..., 0] < 100)
    assert blue.mean() > 0.3 and red.mean() > 0.05, (blue.mean(), red.mean())
    page.evaluate("window.scrollTo(0, 0)")
    screenshot(page, "playground")


# Last: its extra jobs would crowd the README's gallery.
def test_ctrl_enter_again_while_sending_makes_no_second_job(site: ServerProcess, pages: Pages) -> None:
    """Ctrl+Enter pressed again, or held down (key repeat), while the first request is on its way
    makes one job, not two (each one costs the key a generation)."""
    page = open_playground(pages, site.url)
    prompt = "one press, one job"
    fill(page, **SMALL, prompt=prompt)
    # Dispatched in the page: Playwright's own presses are slower than a loopback POST's round trip,
    # which a person's double press or a held key easily beats on a real network.
    page.evaluate(
        """() => {
          const prompt = document.getElementById("prompt");
          const press = (repeat) =>
            prompt.dispatchEvent(new KeyboardEvent("keydown", {key: "Enter", ctrlKey: true, repeat, bubbles: true}));
          press(false);
          setTimeout(() => press(true), 5);
          setTimeout(() => press(false), 10);
        }"""
    )
    wait_done(page)
    jobs = httpx.get(f"{site.url}/v1/jobs", params={"limit": 100}, timeout=30).json()["data"]
    made = [job["id"] for job in jobs if job["params"] and job["params"]["prompt"] == prompt]
    assert len(made) == 1, f"{len(made)} jobs: {made}"
