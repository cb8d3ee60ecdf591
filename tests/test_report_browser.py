"""HTML reports opened from disk in a real headless Chromium (tests/browser.py, the DevTools protocol over a pipe):
images rendered per label, no network request, no console error, a click on a confusion cell shows its images,
hostile paths and labels shown as text and never run, and a 5,000-image report that opens and renders lazily.

Screenshots are kept under pytest's tmp dir (printed with -s); they are never committed. Without Chromium (Debian
package `chromium`, which .ci/run installs when it can) these tests are skipped, saying so."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipcli import report
from tests.browser import Browser, chromium_path
from tests.test_cli import LABELS, expected_paths, invoke
from tests.test_report import HOSTILE_LABEL, SCRIPT_LABEL, report_data

CARDS_PER_LABEL = """[...document.querySelectorAll('details.group[data-view="label"]')].map(group => [
    group.querySelector('summary .name').textContent, Number(group.dataset.count),
    group.querySelectorAll('figure.card').length])"""


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    if executable is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    chromium = Browser(executable)
    yield chromium
    chromium.close()


def open_report(browser: Browser, page: Path) -> float:
    """Open a report; the seconds until its load event. Checks that it drew itself and asked for nothing but itself."""
    seconds = browser.open(page)
    assert browser.evaluate("document.body.dataset.ready") == "true", browser.errors()
    # The thumbnails in view are valid images (those further down load lazily, as they come into view).
    settle(browser)
    browser.evaluate("document.images[0].scrollIntoView()")
    assert browser.evaluate("""Promise.all([...document.images].filter(image => {
        const box = image.getBoundingClientRect(); return box.bottom > 0 && box.top < innerHeight;
    }).map(image => image.decode().then(() => image.naturalWidth))).then(widths => widths.length > 0 &&
        widths.every(width => width > 0))""", timeout=30)
    browser.evaluate("window.scrollTo(0, 0)")
    assert browser.requests() == [page.resolve().as_uri()]  # the file itself, nothing else
    assert browser.errors() == []
    return seconds


def settle(browser: Browser) -> None:
    """Let the page draw what it scheduled (cards are made by an IntersectionObserver, after layout)."""
    browser.evaluate("new Promise(done => requestAnimationFrame(() => setTimeout(done, 100)))")


def keep_screenshot(browser: Browser, tmp_path: Path, name: str) -> Path:
    shot = browser.screenshot(tmp_path / f"{name}.png", full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000
    print(f"screenshot: {shot}")
    return shot


def test_classify_report_in_the_browser(browser, tiny_model_dir, image_folder, reference, tmp_path, monkeypatch):
    monkeypatch.chdir(image_folder.parent)
    page = tmp_path / "classify.html"
    result = invoke("classify", image_folder.name, "-l", ",".join(LABELS), "-o", page, "-m", tiny_model_dir)
    assert result.exit_code == 0, result.stderr
    probs = reference.probs(expected_paths(image_folder.name), LABELS)
    open_report(browser, page)
    counts = np.bincount(probs.argmax(-1), minlength=len(LABELS))
    want = [[label, int(n), int(n)] for label, n in zip(LABELS, counts, strict=True) if n]
    assert browser.evaluate(CARDS_PER_LABEL) == want  # every image drawn, in its top label's group, labels in order
    low = int((probs.max(-1) < report.LOW_CONFIDENCE).sum())
    assert browser.evaluate("document.querySelectorAll('figure.card.low').length") == low
    assert browser.evaluate("document.querySelectorAll('figure.card.low .badge').length") == low
    # Each card: its path and its top-k scores, best first.
    cards = browser.evaluate("""[...document.querySelectorAll('details.group figure.card')].map(card => [
        card.querySelector('.path').textContent,
        [...card.querySelectorAll('ol.scores .label')].map(label => label.textContent)])""")
    for path, shown in cards:
        row = probs[expected_paths(image_folder.name).index(path)]
        assert shown == [LABELS[i] for i in np.argsort(-row)]
    # The reader moves the threshold between the top scores: the images below it are marked, and "only
    # low-confidence" keeps just them.
    threshold = float(np.median(probs.max(-1)))
    low = int((probs.max(-1) < threshold).sum())
    assert 0 < low < len(probs)
    browser.evaluate(f"""(() => {{ const input = document.querySelector('.controls input[type=number]');
        input.value = '{threshold!r}'; input.dispatchEvent(new Event('change')); }})()""")
    settle(browser)
    assert browser.evaluate("document.querySelectorAll('figure.card.low').length") == low
    assert browser.evaluate("document.querySelectorAll('figure.card:not(.low)').length") == len(probs) - low
    keep_screenshot(browser, tmp_path, "classify")
    browser.click(".controls input[type=checkbox]")
    settle(browser)
    assert browser.evaluate("document.querySelector('.controls input[type=checkbox]').checked")
    assert browser.evaluate("document.querySelectorAll('figure.card').length") == low
    assert browser.evaluate("document.querySelectorAll('figure.card.low').length") == low
    assert browser.errors() == []


def test_eval_report_confusion_cell_shows_its_images(browser, tiny_model_dir, tmp_path):
    from tests.test_eval import sample_images

    root = tmp_path / "data"
    for number, folder in enumerate(["cat", "dog", "red car", "tree", "boat"]):
        sample_images(root / folder, 2 + number % 3)
    page = tmp_path / "eval.html"
    result = invoke("eval", root, "-o", page, "-m", tiny_model_dir)
    assert result.exit_code == 0, result.stderr
    meta, images = report_data(page.read_text(encoding="utf-8"))
    matrix = meta["metrics"]["confusion_matrix"]
    open_report(browser, page)
    shown = browser.evaluate("[...document.querySelectorAll('.metric')].map(m => [m.dataset.metric, "
                             "m.querySelector('b').textContent])")
    assert shown == [[key, f"{meta['metrics'][key]:.4f}"] for key in ("acc1", "acc5", "mean_per_class_recall")]
    cells = browser.evaluate("[...document.querySelectorAll('table.confusion td')].map(td => "
                             "[Number(td.dataset.true), Number(td.dataset.pred), Number(td.textContent)])")
    assert cells == [[t, p, matrix[t][p]] for t in range(5) for p in range(5)]
    # Misclassified, by true class: one group per class with errors, holding exactly them.
    wrong = browser.evaluate("""[...document.querySelectorAll('details.group[data-view="wrong"]')].map(g =>
        [g.querySelector('summary .name').textContent, g.querySelectorAll('figure.card').length])""")
    assert wrong == [[label, sum(row) - row[t]] for t, (label, row) in enumerate(zip(meta["labels"], matrix,
                                                                                     strict=True)) if sum(row) > row[t]]
    t, p = max(((t, p) for t in range(5) for p in range(5) if matrix[t][p]), key=lambda cell: (cell[0] != cell[1],
                                                                                               matrix[cell[0]][cell[1]]))
    browser.click(f'table.confusion td[data-true="{t}"][data-pred="{p}"]')
    settle(browser)
    picked = browser.evaluate("""[...document.querySelectorAll('#picked figure.card .path')].map(n => n.textContent)""")
    assert sorted(picked) == sorted(im["p"] for im in images if im["y"] == t and im["k"][0][0] == p)
    assert len(picked) == matrix[t][p] > 0
    assert browser.evaluate("document.querySelector('#picked h2').textContent") == (
        f"True {meta['labels'][t]}, predicted {meta['labels'][p]}")
    assert browser.evaluate("document.querySelectorAll('td.picked').length") == 1
    assert browser.errors() == []
    keep_screenshot(browser, tmp_path, "eval")


def test_hostile_names_are_shown_as_text_and_never_run(browser, tiny_model_dir, tmp_path):
    from tests.conftest import photo

    folder = tmp_path / "in"
    folder.mkdir()
    names = ["<script>.jpg", "<img src=x onerror=window.__pwned=3>.png", '" onmouseover="window.__pwned=4.jpg']
    for name in names:
        photo(30, 30).save(folder / name, format="PNG" if name.endswith(".png") else "JPEG")
    page = tmp_path / "r.html"
    labels = [HOSTILE_LABEL, SCRIPT_LABEL, "cat"]
    result = invoke("classify", folder, "-l", ",".join(labels), "-o", page, "-m", tiny_model_dir)
    assert result.exit_code == 0, result.stderr
    open_report(browser, page)
    browser.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    settle(browser)
    assert browser.evaluate("typeof window.__pwned") == "undefined"
    paths = browser.evaluate("[...document.querySelectorAll('figure.card .path')].map(n => n.textContent)")
    assert sorted(Path(p).name for p in paths) == sorted(names)
    groups = browser.evaluate("[...document.querySelectorAll('summary .name')].map(n => n.textContent)")
    assert set(groups) <= set(labels) and groups
    shown = browser.evaluate("[...document.querySelectorAll('ol.scores .label')].map(n => n.textContent)")
    assert set(shown) == set(labels)
    assert browser.evaluate("document.querySelectorAll('img:not([src^=\"data:\"])').length") == 0
    assert browser.evaluate("document.querySelectorAll('[onerror], [onmouseover], script:not([id]):not([type])')"
                            ".length") == 1  # the report's own script
    assert browser.errors() == [] and browser.requests() == [page.resolve().as_uri()]


@pytest.mark.large
def test_five_thousand_images_open_and_render_lazily(browser, tmp_path):
    count, labels = 5000, ["cat", "dog", "red car", "rocket ship", "tree", "boat", "house"]
    rng = np.random.default_rng(0)
    folder = tmp_path / "many"
    folder.mkdir()
    paths = []
    for i in range(count):
        path = folder / f"{i:04d}.png"
        Image.new("RGB", (12, 12), tuple(int(v) for v in rng.integers(0, 256, 3))).save(path)
        paths.append(str(path))
    scores = rng.dirichlet(np.ones(len(labels)) * 0.5, size=count).astype(np.float32)
    page = tmp_path / "many.html"
    started = time.monotonic()
    report.write_classify_report(page, paths, scores, labels, top_k=3)
    written = time.monotonic() - started
    size = page.stat().st_size
    # README's bound: each image adds at most a thumbnail (THUMBNAIL_MAX_BYTES, base64: 4/3 of it) plus its path and
    # scores; tiny images come far below it.
    assert size <= count * (report.THUMBNAIL_MAX_BYTES * 4 // 3 + 400) + 100_000
    assert size <= 5_000_000
    seconds = open_report(browser, page)
    per_label = browser.evaluate(CARDS_PER_LABEL)
    counts = np.bincount(scores.argmax(-1), minlength=len(labels))
    assert [[label, n] for label, n, _ in per_label] == [[label, int(n)] for label, n in zip(labels, counts,
                                                                                             strict=True) if n]
    drawn = sum(cards for *_, cards in per_label)
    assert 0 < drawn < count // 4  # only what is near the viewport was made
    for _ in range(3):
        browser.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        settle(browser)
    more = sum(cards for *_, cards in browser.evaluate(CARDS_PER_LABEL))
    assert more > drawn  # scrolling makes more
    assert browser.errors() == []
    print(json.dumps({"images": count, "report_bytes": size, "write_s": round(written, 2),
                      "open_s": round(seconds, 2), "cards_at_open": drawn, "cards_after_scrolling": more}))
    keep_screenshot(browser, tmp_path, "five-thousand")
