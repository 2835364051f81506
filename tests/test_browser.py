"""The book as a reader sees it: build it under the `ci` profile, serve it on 127.0.0.1 and open
every page in headless Chromium with no network. Every page loads only local resources, every
figure image is there, equations are typeset by the book's own MathJax.

Needs Debian's `chromium` and `chromium-driver` (.ci/setup installs them); skipped without them.
Set SAE_REPRO_SCREENSHOTS=DIR to keep a screenshot of a chapter page.
"""

import functools
import http.server
import json
import os
import re
import shutil
import threading
import urllib.request
from pathlib import Path

import pytest

from sae_repro import book, pipeline
from sae_repro.cache import cache_dir

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="headless Chromium not installed (Debian: apt-get install chromium chromium-driver; "
           ".ci/setup does it)")


@pytest.fixture(scope="module")
def built_book(tmp_path_factory) -> Path:
    """Run every notebook under `ci` and build the book, all in a temporary copy of book/."""
    tmp = tmp_path_factory.mktemp("book")
    real = cache_dir()
    (tmp / "cache").mkdir()
    for sub in ("pypi", "corpus", "models", "tokens", "mathjax"):  # registry downloads only
        (real / sub).mkdir(exist_ok=True)
        (tmp / "cache" / sub).symlink_to(real / sub)
    shutil.copytree(REPO / "book", tmp / "book",
                    ignore=shutil.ignore_patterns("_build", "_generated", "*.ipynb"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAE_REPRO_CACHE", str(tmp / "cache"))
        mp.setenv("SAE_REPRO_BOOK", str(tmp / "book"))
        mp.delenv("SAE_REPRO_EXECUTED", raising=False)
        mp.delenv("SAE_REPRO_FIGURES", raising=False)
        pipeline.run("ci", jobs=2)
        index = book.build()
    return index.parent


@pytest.fixture(scope="module")
def manifest(built_book) -> dict:
    """The `ci` figures' manifest (tmp/book/_build/html -> tmp/cache/figures/ci)."""
    return json.loads((built_book.parents[2] / "cache" / "figures" / "ci" / "manifest.json").read_text())


def _pages(html: Path) -> list[Path]:
    return sorted(p for p in html.rglob("*.html") if "_static" not in p.parts)


def _is_redirect(page: Path) -> bool:
    """jupyter-book's index.html only redirects to the root page (checked as that page)."""
    return 'http-equiv="Refresh"' in page.read_text()[:500]


def test_no_page_needs_the_network(built_book):
    for page in _pages(built_book):
        text = page.read_text()
        external = re.findall(r'<(?:script|link|img|source|iframe)\b[^>]*?(?:src|href)="(https?:[^"]+)"',
                              text)
        assert not external, f"{page.name} loads {external}"
        assert "cdn.jsdelivr" not in text and "fonts.googleapis" not in text
    assert (built_book / "_static" / "mathjax" / "tex-chtml.js").stat().st_size > 100_000


def test_book_pages_are_there(built_book):
    names = {p.relative_to(built_book).as_posix() for p in _pages(built_book)}
    for page in ("intro.html", "reproducibility.html", "api.html", "references.html",
                 "chapters/dark_matter_synthetic.html", "chapters/model_and_data.html"):
        assert page in names
    repro = (built_book / "reproducibility.html").read_text()
    assert "gpt2-small-resid-post-v5-32k" in repro and "tiny-random" in repro  # profiles table
    cells = re.sub(r"<[^>]+>", " ", repro)  # the run-times table as text
    assert re.search(r"dark_matter_synthetic\s+ci\s+\d+ s\s", cells)  # a measured run time
    refs = (built_book / "references.html").read_text()
    assert all(a in refs for a in ("2410.14670", "2411.02124", "2411.10397", "SmolLM2"))
    assert 'id="sae_repro.pipeline.run"' in (built_book / "api.html").read_text()


@pytest.fixture(scope="module")
def server(built_book):
    handler = functools.partial(_QuietHandler, directory=str(built_book))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage", "--window-size=1280,1600",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)  # no Selenium Manager
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


# Resolves when MathJax (if the page loads it) has typeset the page.
_TYPESET = """
const done = arguments[arguments.length - 1];
// MathJax may still be starting when the page's load event fires: wait up to 20 s for it.
const t0 = Date.now();
(function poll() {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    MathJax.startup.promise.then(() => done("typeset"), (e) => done("error: " + e));
  } else if (Date.now() - t0 > 20000) { done("no mathjax"); } else { setTimeout(poll, 100); }
})();
"""

_STATE = """
return {
  ready: document.readyState,
  title: document.title,
  images: [...document.images].map(i => [i.getAttribute("src"), i.complete, i.naturalWidth]),
  math: document.querySelectorAll(".math").length,
  untypeset: [...document.querySelectorAll(".math")].filter(m => !m.querySelector("mjx-container")).length,
  mjx: document.querySelectorAll("mjx-container").length,
  text: document.body.innerText,
  cites: [...document.querySelectorAll(".sae-figure-cite")].map(c => c.id),
  resources: performance.getEntriesByType("resource").map(r => r.name),
};
"""


@needs_chromium
def test_every_page_loads_with_its_figures_and_typeset_equations(built_book, manifest, server,
                                                                  browser):
    pages = [p for p in _pages(built_book) if not _is_redirect(p)]
    assert len(pages) >= 6
    seen_math = 0
    for page in pages:
        rel = page.relative_to(built_book).as_posix()
        browser.get(f"{server}/{rel}")
        has_math = browser.execute_script('return document.querySelectorAll(".math").length')
        status = browser.execute_async_script(_TYPESET) if has_math else "no math"
        s = browser.execute_script(_STATE)
        assert s["ready"] == "complete" and s["title"], rel
        assert not [r for r in s["resources"] if not r.startswith(server)], f"{rel}: off-site load"
        for src, complete, width in s["images"]:
            assert complete and width > 0, f"{rel}: image {src} did not load"
        if s["math"]:
            seen_math += 1
            assert status == "typeset", f"{rel}: MathJax {status}"
            assert s["untypeset"] == 0 and s["mjx"] >= s["math"], f"{rel}: raw TeX left"
            assert "\\(" not in s["text"] and "$$" not in s["text"], f"{rel}: raw TeX left"
            assert any(r.endswith(".woff") for r in s["resources"]), f"{rel}: no MathJax font"
        if rel.startswith("chapters/"):
            figs = sorted(k for k, e in manifest.items() if e["notebook"] == page.stem)
            assert sorted(c.removeprefix("figure-") for c in s["cites"]) == figs, rel
            images = [k for k in figs if f"{k}.png" in manifest[k]["files"]]  # pages have no image
            assert len(s["images"]) >= len(images), f"{rel}: missing figure images"
            for fig in figs:  # the files linked under each figure (or HTML view) are served
                for f in manifest[fig]["files"]:
                    with urllib.request.urlopen(f"{server}/_static/figures/ci/{f}") as r:
                        assert len(r.read()) > 0
    assert seen_math >= 2  # the introduction and the Dark Matter chapter have equations


@needs_chromium
def test_screenshot_of_a_chapter(built_book, server, browser, tmp_path):
    browser.get(f"{server}/chapters/dark_matter_synthetic.html")
    assert browser.execute_async_script(_TYPESET) == "typeset"
    # show the first figure with its citation block under it
    browser.execute_script('document.querySelector(".sae-figure-cite").scrollIntoView({block: "end"})')
    out = Path(os.environ.get("SAE_REPRO_SCREENSHOTS", tmp_path)) / "dark_matter_synthetic.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(out))
    assert out.stat().st_size > 20_000  # a rendered page, not a blank one


_HOVER = """
const tok = document.querySelector(arguments[0] + " .sae-tok");
tok.scrollIntoView({block: "center"});
tok.dispatchEvent(new MouseEvent("mouseover", {bubbles: true}));
return {hover: tok.closest(".sae-view").querySelector(".sae-hover").textContent,
        token: tok.textContent, background: tok.style.background,
        resources: performance.getEntriesByType("resource").map(r => r.name)};
"""


@needs_chromium
@pytest.mark.parametrize("page, view", [
    ("_static/figures/ci/latents-tokens-in-context.html", "#tokens-in-context"),
    ("_static/figures/ci/latents-side-by-side.html", "#cards-side-by-side"),
    ("_static/figures/ci/latents-topk.html", "#cards-topk"),
    ("chapters/reading_latents.html", "#tokens-in-context"),  # the same views inline in the chapter
    ("chapters/dark_matter_scaling.html", "#dm-tokens-in-context"),  # which words carry the error
    ("chapters/mutual_choice.html", "#mc-tokens-in-context"),  # which tokens get more latents
])
def test_token_view_and_latent_cards_show_numbers_on_hover(built_book, server, browser, tmp_path,
                                                           page, view):
    browser.get(f"{server}/{page}")
    s = browser.execute_script(_HOVER, view)
    assert re.search(r": -?\d+(\.\d+)?(e[-+]\d+)?$", s["hover"]), s["hover"]
    assert s["token"] in s["hover"]
    assert s["background"].startswith("rgba(214, 69, 30")
    assert not [r for r in s["resources"] if not r.startswith(server)], f"{page}: off-site load"
    if view.endswith("tokens-in-context"):  # the menu switches the quantity the hover reports
        sel = browser.find_element("css selector", f"{view} select")
        options = sel.find_elements("css selector", "option")
        assert len(options) >= 5
        browser.execute_script("arguments[0].value = '1'; arguments[0].dispatchEvent(new Event('change'))", sel)
        again = browser.execute_script(_HOVER, view)
        assert options[1].text in again["hover"]
    out = Path(os.environ.get("SAE_REPRO_SCREENSHOTS", tmp_path)) / (Path(page).stem + ".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(out)) and out.stat().st_size > 10_000


_WIDTH = """
const t = document.querySelector("table.sae-verdicts");
return t ? {table: t.scrollWidth, column: t.parentElement.clientWidth,
            page: document.documentElement.scrollWidth, window: window.innerWidth} : null;
"""


@needs_chromium
def test_verdict_table_fits_a_1000_pixel_column(built_book, server, browser):
    browser.set_window_size(1000 + 2 * 160, 1600)  # the content column is narrower than this
    try:
        browser.get(f"{server}/intro.html")
        w = browser.execute_script(_WIDTH)
        assert w is not None, "no verdict table on the introduction"
        assert w["table"] <= w["column"] and w["page"] <= w["window"], w
    finally:
        browser.set_window_size(1280, 1600)
