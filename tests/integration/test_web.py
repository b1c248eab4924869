"""The web page at `/`, driven in a real headless Chromium (Debian's, through Playwright), on
the real models: what a person would see. Screenshots go to test-artifacts/."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Locator,
    Page,
    Route,
    expect,
    sync_playwright,
)

from bench.cascade import photo_dir
from tests.support import ServerProcess, clean_env, overwrite_meta, tiny_env

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHELSEA = photo_dir() / "chelsea.png"  # the models disagree: tiger cat, then Egyptian cat
COFFEE = photo_dir() / "coffee.png"  # they agree: espresso
SLOW = 60_000  # ms; the first accurate answer includes the worker's first batch


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM.exists(), "Debian's chromium is missing: scripts/ensure-system-deps installs it"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield browser
        browser.close()


def refusals(page: Page) -> list[str]:
    """What the page's Content-Security-Policy refused, as Chromium reports it."""
    refused: list[str] = []
    page.on(
        "console",
        lambda message: (
            refused.append(message.text) if "Content Security Policy" in message.text else None
        ),
    )
    return refused


@contextlib.contextmanager
def browsing(browser: Browser, url: str) -> Iterator[Page]:
    """The page at `url`, in a fresh context; fails on a JavaScript error, and on anything
    the page's own policy refused."""
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    refused = refusals(page)
    page.goto(url + "/")
    yield page
    context.close()
    assert not errors, f"JavaScript errors: {errors}"
    assert not refused, f"the page's own policy refused: {refused}"


@pytest.fixture
def page(browser: Browser, real_server: ServerProcess) -> Iterator[Page]:
    with browsing(browser, real_server.url) as page:
        yield page


def test_the_page_refuses_script_that_was_not_shipped_with_it(
    browser: Browser, real_server: ServerProcess
) -> None:
    """Its inline script and style are allowed by hash, and nothing else inline: markup a
    label or a message managed to inject could not run."""
    context = browser.new_context()
    page = context.new_page()
    refused = refusals(page)
    response = page.goto(real_server.url + "/")
    assert response is not None
    policy = response.headers["content-security-policy"]
    assert "script-src 'sha256-" in policy
    assert "'unsafe-inline'" not in policy
    expect(page.locator("#health")).to_contain_text("queue")  # its own script ran
    injected = page.evaluate(
        """() => {
            const node = document.createElement("script");
            node.textContent = "window.injected = true";
            document.body.append(node);
            const image = document.createElement("img");
            image.setAttribute("onerror", "window.injected = true");
            image.src = "no-such-image";
            document.body.append(image);
            return new Promise((done) => setTimeout(() => done(window.injected === true), 300));
        }"""
    )
    context.close()
    assert injected is False
    assert refused  # Chromium said why


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_a_photo_gets_the_fast_answer_then_the_accurate_one_marked_changed(page: Page) -> None:
    empty = "getComputedStyle(document.querySelector('#recent'), '::before').content"
    assert page.evaluate(empty) == '"None yet: the images you send appear here."'
    page.set_input_files("#file", str(CHELSEA))
    fast = page.locator("#fast-answer .topk li")
    expect(fast).to_have_count(5)
    expect(fast.first).to_contain_text("tiger cat")
    accurate = page.locator("#accurate-answer .topk li")
    expect(accurate.first).to_contain_text("Egyptian cat", timeout=SLOW)
    expect(accurate).to_have_count(5)
    expect(page.locator("#verdict")).to_have_text(
        "The accurate model changed the answer: tiger cat → Egyptian cat"
    )
    expect(page.locator("#fast-answer li.disagree")).to_contain_text("tiger cat")
    expect(page.locator("#accurate-answer li.disagree")).to_contain_text("Egyptian cat")
    expect(page.locator("#recent li").first).to_contain_text("tiger cat → Egyptian cat (done)")
    assert page.evaluate(empty) == "none"  # a job listed, the placeholder gone
    screenshot(page, "web-disagree")


def test_agreeing_models_show_no_mark_and_the_chart_fills(page: Page) -> None:
    page.set_input_files("#file", str(COFFEE))
    expect(page.locator("#accurate-answer .topk li").first).to_contain_text(
        "espresso", timeout=SLOW
    )
    expect(page.locator("#verdict")).to_have_text("Both models agree: espresso")
    expect(page.locator(".topk li.disagree")).to_have_count(0)
    page.reload()  # the chart and the recent jobs come back from the server and the browser
    expect(page.locator("#result")).to_be_hidden()
    expect(page.locator("#chart rect.agree").first).to_be_attached(timeout=10_000)
    expect(page.locator("#stats-summary")).to_contain_text(re.compile(r"agreement \d"))
    expect(page.locator("#recent li").first).to_contain_text("espresso (done)")
    screenshot(page, "web-agree")


def test_health_of_both_models_and_the_queue_is_shown(page: Page) -> None:
    health = page.locator("#health li")
    expect(health).to_have_count(3)
    expect(page.locator("#health li.ok")).to_have_count(3)
    expect(health).to_have_text(["efficientnet_lite0", "efficientnet_lite2", "queue"])


def test_the_page_asks_for_nothing_it_does_not_get(
    browser: Browser, real_server: ServerProcess
) -> None:
    """Every request the page makes on its own is answered, the browser's icon included: a
    404 for /favicon.ico had been a console error and an access line on every visit."""
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on(
        "console", lambda message: errors.append(message.text) if message.type == "error" else None
    )
    page.goto(real_server.url + "/")
    expect(page.locator("#health li.ok")).to_have_count(3)
    page.wait_for_load_state("networkidle")
    assert errors == []
    icon = page.evaluate(
        "() => fetch(document.querySelector('link[rel=icon]').href)"
        ".then(r => [r.status, r.headers.get('content-type')])"
    )
    context.close()
    assert icon == [200, "image/svg+xml"]


def behind_a_path(
    context: BrowserContext, server_url: str, path: str, *, strip: bool = True
) -> list[str]:
    """Serve `server_url` to the browser under `path`, as a reverse proxy that strips it
    would (nginx's `location /tandem/ { proxy_pass http://tandem/; }`), or passes it on
    (`proxy_pass http://tandem;`); returns the list of URLs the browser asked for outside
    it, each refused."""
    outside: list[str] = []

    def reverse_proxy(route: Route) -> None:
        url = route.request.url
        if url.startswith(f"{server_url}{path}/"):
            route.continue_(url=server_url + url.removeprefix(server_url + path) if strip else url)
        else:
            outside.append(url)
            route.abort()

    context.route("**/*", reverse_proxy)
    return outside


def test_the_page_works_where_a_reverse_proxy_serves_it_under_a_path(
    browser: Browser, real_server: ServerProcess
) -> None:
    """Every request the page makes, its icon's included, stays under the proxy's path: the
    page names no URL from the root, and needs no TANDEM_ROOT_PATH."""
    context = browser.new_context()
    outside = behind_a_path(context, real_server.url, "/tandem")
    page = context.new_page()
    page.goto(real_server.url + "/tandem/")
    expect(page.locator("#health li.ok")).to_have_count(3)
    page.set_input_files("#file", str(CHELSEA))
    expect(page.locator("#accurate-answer .topk li").first).to_contain_text(
        "Egyptian cat", timeout=SLOW
    )
    icon = page.evaluate(
        "() => fetch(document.querySelector('link[rel=icon]').href)"
        ".then(r => r.status, () => 'not fetched')"
    )
    context.close()
    assert outside == []
    assert icon == 200


@pytest.mark.parametrize("strip", [True, False], ids=["stripped", "passed-on"])
def test_the_api_docs_work_under_a_proxy_s_path_with_tandem_root_path(
    browser: Browser, tiny_dir: Path, tmp_path: Path, strip: bool
) -> None:
    """Swagger UI named its schema and files from the root, which a proxy serving Tandem
    under a path does not pass on: the docs were blank there."""
    env = tiny_env(tiny_dir, tmp_path, root_path="/tandem")
    server = ServerProcess(tmp_path / "server.log", env, "--no-worker").start()
    context = browser.new_context()
    outside = behind_a_path(context, server.url, "/tandem", strip=strip)
    page = context.new_page()
    try:
        page.goto(server.url + "/tandem/docs")
        operations = page.locator(".opblock-summary-path")
        expect(operations.filter(has_text="/predict").first).to_be_visible(timeout=20_000)
        expect(_tried_out(page, "/health")).to_have_text("200")  # sent under the path
    finally:
        context.close()
        server.stop()
    assert outside == []


def test_a_file_that_is_not_an_image_is_explained(page: Page, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    page.set_input_files("#file", str(notes))
    expect(page.locator("#status")).to_contain_text("Refused (")
    expect(page.locator("#status")).to_have_class("error")
    screenshot(page, "web-refused")


def test_a_recent_job_opens_again_after_a_reload(page: Page) -> None:
    page.set_input_files("#file", str(CHELSEA))
    expect(page.locator("#accurate-answer .topk li").first).to_contain_text(
        "Egyptian cat", timeout=SLOW
    )
    page.reload()
    page.locator("#recent li").first.click()
    expect(page.locator("#accurate-answer .topk li").first).to_contain_text("Egyptian cat")
    expect(page.locator("#verdict")).to_contain_text("changed")


KEY = "a-web-page-test-key"


@pytest.fixture(scope="module")
def keyed_server(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    data_dir = tmp_path_factory.mktemp("keyed")
    env = clean_env(model_dir=str(model_dir), data_dir=str(data_dir), api_keys=KEY)
    server = ServerProcess(data_dir / "server.log", env).start()
    yield server
    server.stop()


def test_a_server_with_api_keys_gets_one_from_the_page_then_answers(
    browser: Browser, keyed_server: ServerProcess
) -> None:
    with browsing(browser, keyed_server.url) as page:
        _get_a_key_then_answer(page)


def _get_a_key_then_answer(page: Page) -> None:
    expect(page.locator("#key-form")).to_be_visible()  # /stats was refused: the page asks
    page.set_input_files("#file", str(COFFEE))
    expect(page.locator("#status")).to_contain_text("Refused (unauthorized)")
    screenshot(page, "web-api-key-asked")
    # No header carries it: kept, it had made every call throw before it was sent, so that
    # no 401 ever asked again, and the tab was stuck until closed.
    page.fill("#key", "\u043a\u043b\u044e\u0447")
    page.click("#key-form button")
    expect(page.locator("#key-form")).to_be_visible()
    assert page.evaluate("() => sessionStorage.length") == 0
    page.fill("#key", KEY)
    page.click("#key-form button")
    expect(page.locator("#key-form")).to_be_hidden()
    page.set_input_files("#file", str(CHELSEA))
    expect(page.locator("#fast-answer .topk li").first).to_contain_text("tiger cat")
    # Without SSE (it cannot carry the key), the long-poll brings the accurate answer.
    expect(page.locator("#accurate-answer .topk li").first).to_contain_text(
        "Egyptian cat", timeout=SLOW
    )
    page.reload()  # the key stays for this tab: the chart loads with no question asked
    expect(page.locator("#chart rect.agree").first).to_be_attached(timeout=10_000)
    expect(page.locator("#key-form")).to_be_hidden()
    screenshot(page, "web-api-key")


def _tried_out(page: Page, path: str) -> Locator:
    """Swagger UI's "Try it out" and "Execute" on the operation at `path`; its status cell."""
    page.locator(".opblock-summary-path").filter(has_text=path).first.click()
    page.get_by_role("button", name="Try it out").first.click()
    page.get_by_role("button", name="Execute").first.click()
    return page.locator(".live-responses-table tbody .response-col_status").first


def test_with_api_keys_the_docs_take_a_key_for_their_calls(
    browser: Browser, keyed_server: ServerProcess
) -> None:
    """The schema was guarded like the API: Swagger UI could not load it, and /docs showed an
    error on every server with keys."""
    context = browser.new_context()
    page = context.new_page()
    page.goto(keyed_server.url + "/docs")
    operations = page.locator(".opblock-summary-path")
    expect(operations.filter(has_text="/metadata").first).to_be_visible(timeout=20_000)
    page.locator("button.authorize").first.click()
    page.locator(".auth-container input").first.fill(KEY)
    page.locator(".auth-container button.authorize").first.click()
    page.locator("button.btn-done").first.click()
    expect(_tried_out(page, "/metadata")).to_have_text("200")
    screenshot(page, "api-docs-keyed")
    context.close()


@pytest.mark.parametrize("keyed", [False, True], ids=["stream", "long-poll"])
def test_the_page_follows_its_job_across_a_restart_of_the_proxy(
    browser: Browser, own_idle: ServerProcess, keyed: bool
) -> None:
    """The proxy ends its streams when it shuts down; the page's long-poll took over, met
    the proxy down, and stopped following (an unhandled rejection)."""
    if keyed:  # long-polls from the start: an EventSource cannot carry the key
        own_idle.stop()
        own_idle.env["TANDEM_API_KEYS"] = KEY
        own_idle.start()
    with browsing(browser, own_idle.url) as page:
        if keyed:
            page.evaluate(f"sessionStorage.setItem('tandem.key', '{KEY}')")
        page.set_input_files("#file", str(COFFEE))
        expect(page.locator("#accurate-answer .pending")).to_contain_text("job queued")
        own_idle.stop()
        own_idle.start()  # the same port and store
        job_id = page.locator("#recent li").first.get_attribute("data-job")
        with own_idle.client() as client:
            headers = {"Authorization": f"Bearer {KEY}"} if keyed else {}
            assert client.delete(f"/job/{job_id}", headers=headers).status_code == 200
        expect(page.locator("#accurate-answer .pending")).to_have_text(
            "The job cancelled.", timeout=30_000
        )


def test_the_api_docs_render_from_the_server_alone(
    browser: Browser, real_server: ServerProcess
) -> None:
    """FastAPI's pages took their scripts from a CDN: blank on a private network or offline.
    Under its Content-Security-Policy the page still renders, and "Try it out" still works."""
    context = browser.new_context()
    page = context.new_page()
    elsewhere: list[str] = []

    def only_the_server(route: Route) -> None:
        if route.request.url.startswith(real_server.url):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    page.route("**/*", only_the_server)
    refused: list[str] = []
    page.on("console", lambda message: refused.append(message.text))
    response = page.goto(real_server.url + "/docs")
    assert response is not None
    assert "default-src 'none'" in response.headers["content-security-policy"]
    operations = page.locator(".opblock-summary-path")
    expect(operations.filter(has_text="/predict").first).to_be_visible(timeout=20_000)
    # "Try it out" fetches from the page's own origin, which its policy allows.
    expect(_tried_out(page, "/health")).to_have_text("200")
    screenshot(page, "api-docs")
    context.close()
    assert elsewhere == []
    assert not [text for text in refused if "Content Security Policy" in text]


def test_a_job_that_cannot_be_read_any_more_is_explained_not_retried(
    browser: Browser, own_idle: ServerProcess
) -> None:
    """A newer Tandem rewrote the record: its stream ends with an error event, and the
    long-poll that takes over gets a 500 that no retry mends. The page retried it as if the
    proxy were restarting, then said the server had stopped answering."""
    with browsing(browser, own_idle.url) as page:
        page.set_input_files("#file", str(COFFEE))
        expect(page.locator("#accurate-answer .pending")).to_contain_text("job queued")
        job_id = page.locator("#recent li").first.get_attribute("data-job")
        db = Path(own_idle.env["TANDEM_DATA_DIR"]) / "tandem.db"
        overwrite_meta(db, '{"v": 2}', job_id)
        expect(page.locator("#status")).to_contain_text(
            "The job can no longer be followed: job", timeout=10_000
        )
        expect(page.locator("#status")).to_contain_text("(unreadable_job)")
