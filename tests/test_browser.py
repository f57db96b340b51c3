"""The rendered book as a reader meets it: every page of _build/html in headless Chromium, offline.

Per page: it loads with no console errors, every equation is typeset by the bundled MathJax (no raw
TeX left in the text), every image loads, every internal link resolves, and no request leaves
localhost. A full-page screenshot of each page goes to _build/screenshots/.

Needs a built book (`jupyter-book build .`) and Debian's chromium + chromium-driver. Without them
the tests are skipped, unless BOOK_BROWSER_TEST=required (as in .ci/run), which makes them fail.
"""

import base64
import contextlib
import functools
import html.parser
import http.server
import json
import os
import re
import shutil
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
SITE, SHOTS = ROOT / "_build" / "html", ROOT / "_build" / "screenshots"
# Debian's chromium + chromium-driver; elsewhere (a GitHub runner's Chrome) point these two variables at them
CHROMIUM = os.environ.get("BOOK_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("BOOK_CHROMEDRIVER", "/usr/bin/chromedriver")
REQUIRED = os.environ.get("BOOK_BROWSER_TEST") == "required"
# A CDN that a default Sphinx build would load MathJax from: the offline check below must fail to reach it.
CDN_MATHJAX = "https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
    # every host name but localhost resolves to nothing, so no request can leave the machine
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
]


def missing():
    "Why the browser test cannot run here, or None."
    if not SITE.joinpath("index.html").exists():
        return f"{SITE.relative_to(ROOT)} does not exist: build the book first (jupyter-book build .)"
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        return f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "needs selenium (pip install -r requirements.txt)"


def pages():
    "Every HTML page of the site, relative to it (the theme's and Sphinx's own folders excluded)."
    if not SITE.exists():
        return []
    return sorted(
        str(p.relative_to(SITE))
        for p in SITE.rglob("*.html")
        if not p.relative_to(SITE).parts[0].startswith("_")
    )


def test_site_can_be_tested():
    why = missing()
    if why:
        (pytest.fail if REQUIRED else pytest.skip)(why)
    assert "index.html" in pages() and len(pages()) >= 4


MATHJAX_SRC = re.compile(r"<script[^>]*src=\"([^\"]*mathjax[^\"]*)\"", re.I)


def test_mathjax_is_bundled():
    "No page loads MathJax from a CDN: every page points at the copy in _build/html/_static/mathjax."
    if not SITE.joinpath("index.html").exists():
        (pytest.fail if REQUIRED else pytest.skip)(
            f"{SITE.relative_to(ROOT)} does not exist: build the book first"
        )
    assert SITE.joinpath("_static", "mathjax", "tex-chtml.js").is_file(), (
        "the bundled MathJax is missing"
    )
    srcs = {
        page: MATHJAX_SRC.findall(SITE.joinpath(page).read_text(encoding="utf-8"))
        for page in pages()
    }
    remote = {
        page: s
        for page, found in srcs.items()
        for s in found
        if "://" in s or "_static/mathjax/" not in s
    }
    assert not remote, f"pages that load MathJax from elsewhere: {remote}"
    with_math = [
        p for p in srcs if 'class="math' in SITE.joinpath(p).read_text(encoding="utf-8")
    ]
    assert len(with_math) >= 3 and all(srcs[p] for p in with_math), (
        f"pages with math but no MathJax: {srcs}"
    )


def test_colab_install_cell_is_not_rendered():
    "Each chapter's first cell (tagged remove-cell) installs the package in Colab; readers of the site never see it."
    if not SITE.joinpath("index.html").exists():
        (pytest.fail if REQUIRED else pytest.skip)(
            f"{SITE.relative_to(ROOT)} does not exist: build the book first"
        )
    shown = [
        p
        for p in pages()
        if "git+https://github.com/mamba2-book"
        in SITE.joinpath(p).read_text(encoding="utf-8")
    ]
    assert not shown, f"pages that show the Colab install cell: {shown}"


@pytest.fixture(scope="module")
def server():
    why = missing()
    if why:
        (pytest.fail if REQUIRED else pytest.skip)(why)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(SITE))
    )
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser(server, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"
    ]:
        options.add_argument(flag)
    options.set_capability(
        "goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"}
    )
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    yield driver
    driver.quit()


def requests_and_failures(driver):
    "URLs the page requested, and the failed ones with why, from Chromium's network log."
    urls, failed, by_id = [], [], {}
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        params = msg.get("params", {})
        if msg["method"] == "Network.requestWillBeSent":
            by_id[params["requestId"]] = params["request"]["url"]
            urls.append(params["request"]["url"])
        elif (
            msg["method"] == "Network.responseReceived"
            and params["response"]["status"] >= 400
        ):
            failed.append(
                f"{params['response']['url']}: HTTP {params['response']['status']}"
            )
        elif (
            msg["method"] == "Network.loadingFailed"
            and not params.get("canceled")
            and params["requestId"] in by_id
        ):
            # (requests sent before the page's navigation are not the page's: Chromium's own start-up
            # page fails to resolve a name at launch, as it should under --host-resolver-rules)
            failed.append(f"{by_id[params['requestId']]}: {params.get('errorText')}")
    return urls, failed


class Ids(html.parser.HTMLParser):
    "The id and name attributes of one HTML file: the anchors a link can point to."

    def __init__(self, text):
        super().__init__()
        self.ids = set()
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.ids.update(v for k, v in attrs if k in ("id", "name") and v)


@functools.lru_cache(maxsize=None)
def anchors(path):
    return Ids(path.read_text(encoding="utf-8")).ids


def broken_links(hrefs, origin, page):
    "Internal links (same origin) whose file or #anchor does not exist in the built site."
    broken = []
    for href in hrefs:
        url = urlsplit(href)
        if f"{url.scheme}://{url.netloc}" != origin:
            continue
        target = SITE / unquote(url.path).lstrip("/")
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            broken.append(f"{href} (no file {target.relative_to(SITE)})")
        elif (
            url.fragment
            and target.suffix == ".html"
            and unquote(url.fragment) not in anchors(target)
        ):
            broken.append(
                f"{href} (no anchor #{url.fragment} in {target.relative_to(SITE)})"
            )
    return broken


# Runs in the page once loaded: scroll through it (so that anything lazy loads), wait for MathJax's
# typesetting, then report what a reader would see.
INSPECT = """
const done = arguments[arguments.length - 1];
(async () => {
  for (let y = 0; y < document.body.scrollHeight; y += 800) { window.scrollTo(0, y); await new Promise(r => setTimeout(r, 20)); }
  window.scrollTo(0, 0);
  await Promise.all([...document.images].map(img => img.complete ? null : new Promise(r => { img.onload = img.onerror = r; })));
  const mathjax = window.MathJax && MathJax.startup && MathJax.startup.promise;
  if (mathjax) await mathjax;
  const prose = document.body.cloneNode(true);
  prose.querySelectorAll('pre, code, script, style, mjx-container, .highlight').forEach(e => e.remove());
  done({
    mathjax: !!mathjax,
    mathjaxSrc: [...document.scripts].map(s => s.src).filter(s => /mathjax/i.test(s)),
    mathSource: document.querySelectorAll('.math').length,
    typeset: document.querySelectorAll('mjx-container').length,
    mathErrors: document.querySelectorAll('mjx-merror').length,
    text: prose.textContent,
    images: [...document.images].map(img => ({src: img.currentSrc || img.src, ok: img.complete && img.naturalWidth > 0})),
    hrefs: [...document.querySelectorAll('a[href]')].map(a => a.href),
    height: Math.max(document.body.scrollHeight, document.documentElement.scrollHeight),
  });
})().catch(e => done({error: String(e)}));
"""
# raw TeX in the prose: display or inline delimiters, $...\cmd...$, or a bare \command (as a .bib title can leave)
RAW_TEX = re.compile(
    r"\$\$|\\\(|\\\)|\\\[|\\\]|\$[^$\n]*\\[A-Za-z]+[^$\n]*\$|\\[A-Za-z]{2,}"
)


@pytest.mark.parametrize("page", pages())
def test_page(page, server, browser):
    browser.get_log("browser"), browser.get_log("performance")  # start both logs afresh
    browser.get(f"{server}/{page}")
    if 'http-equiv="Refresh"' in SITE.joinpath(page).read_text(
        encoding="utf-8"
    ):  # the root's redirect
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(browser, 10).until(
            lambda d: (
                d.current_url != f"{server}/{page}"
                and d.execute_script("return document.readyState") == "complete"
            )
        )
    seen = browser.execute_async_script(INSPECT)
    assert "error" not in seen, seen
    urls, failed = requests_and_failures(browser)
    console = [
        e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"
    ]

    full_page = {
        "x": 0,
        "y": 0,
        "width": 1280,
        "height": min(seen["height"], 16000),
        "scale": 1,
    }
    shot = browser.execute_cdp_cmd(
        "Page.captureScreenshot",
        {"format": "png", "captureBeyondViewport": True, "clip": full_page},
    )
    SHOTS.joinpath(page.replace("/", "__").replace(".html", ".png")).write_bytes(
        base64.b64decode(shot["data"])
    )

    assert not console, f"console errors: {console}"
    assert not failed, f"failed requests: {failed}"
    outside = [
        u
        for u in urls
        if urlsplit(u).scheme in ("http", "https", "ws", "wss")
        and not u.startswith(server)
    ]
    assert not outside, f"requests that leave localhost: {outside}"
    assert all(
        src.startswith(f"{server}/_static/mathjax/") for src in seen["mathjaxSrc"]
    ), seen["mathjaxSrc"]
    if seen["mathSource"]:
        assert seen["mathjax"], "the page has math but MathJax did not load"
        assert seen["typeset"] >= seen["mathSource"], (
            f"{seen['mathSource']} equations but only {seen['typeset']} typeset"
        )
        assert seen["mathErrors"] == 0, f"{seen['mathErrors']} MathJax errors"
    raw = RAW_TEX.findall(seen["text"])
    assert not raw, f"raw TeX left in the text: {raw[:5]}"
    bad = [img["src"] for img in seen["images"] if not img["ok"]]
    assert not bad, f"images that did not load: {bad}"
    broken = broken_links(seen["hrefs"], server, page)
    assert not broken, f"broken internal links: {broken}"


def test_chapters_have_typeset_math(server, browser):
    "The check above is not vacuous: the chapters do have equations, and MathJax typeset them."
    browser.get(f"{server}/book/02_segsum.html")
    seen = browser.execute_async_script(INSPECT)
    assert (
        seen["mathjax"]
        and seen["mathSource"] >= 10
        and seen["typeset"] >= seen["mathSource"]
    )


def test_browser_is_offline(server, browser):
    "Chromium as started here cannot fetch from outside: math typeset above came from the site itself."
    browser.get(f"{server}/index.html")
    result = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0], {mode: 'no-cors'}).then(() => done('fetched'), e => done('failed: ' + e));",
        CDN_MATHJAX,
    )
    assert result.startswith("failed"), (
        f"the browser reached {CDN_MATHJAX}: the offline check proves nothing"
    )
    browser.get_log("browser"), browser.get_log("performance")


CHAPTERS = [p for p in pages() if re.match(r"book/\d\d_", p)]


@contextlib.contextmanager
def window(driver, width):
    "The browser `width` px wide inside the block, then back to the other tests' 1280 px."
    driver.set_window_size(width, 900)
    try:
        yield
    finally:
        driver.set_window_size(1280, 900)


def visible(driver, selector):
    "Whether any element matching `selector` is on the screen."
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].some(e => {"
        "const r = e.getBoundingClientRect(), s = getComputedStyle(e);"
        "return r.width > 0 && r.height > 0 && r.right > 0 && r.left < window.innerWidth"
        " && s.visibility !== 'hidden' && s.display !== 'none'; });",
        selector,
    )


def click_visible(driver, selector):
    "Click the one button matching `selector` that a reader can see, as a reader would."
    buttons = [
        b for b in driver.find_elements("css selector", selector) if b.is_displayed()
    ]
    assert len(buttons) == 1, f"{len(buttons)} visible {selector} buttons"
    buttons[0].click()


@pytest.mark.parametrize("width", [400, 1400])
def test_sidebars_open_and_close(width, server, browser):
    "The chapter list and the page contents open and close from the visible buttons, on a phone and a desktop."
    import time

    with window(browser, width):
        browser.get(f"{server}/book/04_chunked.html")
        shot = SHOTS / str(width)
        shot.mkdir(exist_ok=True)
        browser.save_screenshot(str(shot / "04_chunked.png"))
        # (on a phone the theme moves the sidebar's links into a dialog while it is open)
        chapter_list = (
            "#pst-primary-sidebar a[href*='05_block'], "
            "#pst-primary-sidebar-modal a[href*='05_block']"
        )
        if width < 992:  # a phone: the chapter list opens over the page, and closes
            assert not visible(browser, chapter_list)
            click_visible(browser, ".primary-toggle")
            time.sleep(0.5)
            assert visible(browser, chapter_list), "the chapter list did not open"
            browser.save_screenshot(str(shot / "04_chunked_chapters.png"))
            browser.switch_to.active_element.send_keys(
                "\ue00c"
            )  # Escape closes the dialog
            time.sleep(0.5)
            assert not visible(browser, chapter_list), "the chapter list did not close"
            click_visible(browser, ".secondary-toggle")
            time.sleep(0.5)
            contents = "#pst-secondary-sidebar a[href*='#'], #pst-secondary-sidebar-modal a[href*='#']"
            assert visible(browser, contents), "the page contents did not open"
        else:  # a desktop: the chapter list hides and comes back
            assert visible(browser, chapter_list)
            click_visible(browser, ".primary-toggle")
            time.sleep(0.5)
            assert not visible(browser, chapter_list), "the chapter list did not hide"
            click_visible(browser, ".primary-toggle")
            time.sleep(0.5)
            assert visible(browser, chapter_list), "the chapter list did not come back"
        navbars = browser.execute_script(
            "return [...document.querySelectorAll('header, .bd-header-article')]"
            ".filter(e => e.getBoundingClientRect().height > 0).length"
        )
        assert navbars == 1, f"{navbars} bars at the top of the page"


@pytest.mark.parametrize("page", CHAPTERS)
def test_phone_screenshot_and_no_page_wider_than_the_screen(page, server, browser):
    "At 400 px nothing makes the page itself scroll sideways (code and equations scroll inside themselves)."
    with window(browser, 400):
        browser.get(f"{server}/{page}")
        (SHOTS / "400").mkdir(exist_ok=True)
        browser.save_screenshot(
            str(SHOTS / "400" / Path(page).with_suffix(".png").name)
        )
        wide = browser.execute_script(
            "return document.documentElement.scrollWidth - window.innerWidth"
        )
        assert wide <= 0, f"the page is {wide} px wider than a 400 px screen"


# What a reader must never see in an output: a build's warnings and progress bars, tracebacks,
# compiler and memory errors, machine paths. (Exceptions a chapter raises on purpose, to show its
# messages, print as "TypeError: ..." and are not noise.)
NOISE = re.compile(
    r"\w*Warning\b|Traceback|\d+%\|[^|]*\||it/s\]|/root/|/home/|\.venv|site-packages|"
    r"/tmp/|InductorError|out of memory|Set TORCH"
)


@pytest.mark.parametrize("page", CHAPTERS)
def test_no_build_noise_in_outputs(page):
    "Executed cells' outputs hold no warnings, progress bars, stderr boxes, tracebacks or machine paths."
    from bs4 import BeautifulSoup

    if not SITE.joinpath(page).exists():
        (pytest.fail if REQUIRED else pytest.skip)("no built book")
    soup = BeautifulSoup(SITE.joinpath(page).read_text(encoding="utf-8"), "html.parser")
    stderr = soup.select(".output.stderr")
    assert not stderr, f"stderr boxes: {[e.get_text()[:80] for e in stderr]}"
    found = [
        (m.group(0), out.get_text()[max(0, m.start() - 40) : m.end() + 40])
        for out in soup.select(".cell_output")
        for m in NOISE.finditer(out.get_text())
    ]
    assert not found, f"build noise in outputs: {found[:5]}"


@pytest.mark.parametrize("page", CHAPTERS)
def test_no_code_block_scrolls_sideways(page, server, browser):
    "At 1400 px every code cell and every printed output fits the column: no comment is cut off."
    with window(browser, 1400):
        browser.get(f"{server}/{page}")
        (SHOTS / "1400").mkdir(exist_ok=True)
        browser.save_screenshot(
            str(SHOTS / "1400" / Path(page).with_suffix(".png").name)
        )
        wide = browser.execute_script(
            "return [...document.querySelectorAll('div.cell div.highlight pre')]"
            ".filter(e => e.scrollWidth > e.clientWidth + 2)"
            ".map(e => e.textContent.split('\\n').reduce((a, b) => a.length > b.length ? a : b))"
        )
        assert not wide, (
            f"{len(wide)} blocks scroll sideways, e.g. {[w[:70] for w in wide[:3]]}"
        )
