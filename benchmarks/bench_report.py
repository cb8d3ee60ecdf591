"""HTML reports at scale: writing and opening a classify report of 1,000 vs 10,000 photos.

Builds (once, under .bench/) synthetic JPEG photos of mixed sizes (640x480 to 12 MP, as the other benchmarks use) and
lists each of them many times over to reach 10,000 entries (each entry is still read and thumbnailed). Random
scores over 10 labels stand in for the model, which this does not measure. For each size it prints the time to write
the report (thumbnails made with Pillow's JPEG draft mode on `--workers` threads), the file size per image, and, in
headless Chromium (tests/browser.py), the time until the page has drawn itself, the cards it made, the JavaScript
heap, and the time to scroll to the end a screen at a time; then the 10,000 / 1,000 ratios. Targets: file size
linear in the images (at most the README's per-image bound), opening time well below linear (cards are made as they
scroll into view).

    .venv/bin/python benchmarks/bench_report.py [--photos 200] [--sizes 1000 10000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import BENCH_DIR, LABELS, image_paths, photo_folder, wait_until_quiet

from clipcli import report
from tests.browser import Browser, chromium_path


def open_and_scroll(browser: Browser, page: Path) -> dict:
    """Open a report, wait for it to draw, then scroll to the bottom until every card is made."""
    seconds = browser.open(page, timeout=600)
    browser.evaluate("new Promise(done => requestAnimationFrame(() => setTimeout(done, 0)))")
    cards = browser.evaluate("document.querySelectorAll('figure.card').length")
    heap = {m["name"]: m["value"] for m in browser.call("Performance.getMetrics", session=True)["metrics"]}
    started = time.monotonic()
    total = browser.evaluate("document.querySelectorAll('details.group').length")
    for _ in range(20000):  # a screen at a time, as a reader scrolls, until the bottom with every card made
        done = browser.evaluate("""new Promise(done => { window.scrollBy(0, innerHeight);
            requestAnimationFrame(() => setTimeout(() => done(!document.querySelector('.more') &&
                scrollY + innerHeight >= document.documentElement.scrollHeight - 2), 0)); })""")
        if done:
            break
    made = browser.evaluate("document.querySelectorAll('figure.card').length")
    return {"open_s": seconds, "cards_at_open": cards, "groups": total, "js_heap_mb": heap["JSHeapUsedSize"] / 2**20,
            "scroll_to_end_s": time.monotonic() - started, "cards_at_end": made, "errors": browser.errors()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=200, help="distinct photos (default 200)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000], help="report sizes (images)")
    parser.add_argument("--workers", type=int, default=None, help="thumbnail threads (default one per core)")
    args = parser.parse_args()
    executable = chromium_path()
    if executable is None:
        sys.exit("needs Chromium (Debian: apt-get install chromium)")
    photos = image_paths(photo_folder(BENCH_DIR / "photos", args.photos), args.photos)
    rng = np.random.default_rng(0)
    results = {}
    browser = Browser(executable)
    browser.call("Performance.enable", session=True)
    try:
        with tempfile.TemporaryDirectory(dir=BENCH_DIR) as out:
            for count in args.sizes:
                paths = [photos[i % len(photos)] for i in range(count)]
                scores = rng.dirichlet(np.ones(len(LABELS)) * 0.3, size=count).astype(np.float32)
                page = Path(out) / f"report-{count}.html"
                wait_until_quiet()
                started = time.perf_counter()
                report.write_classify_report(page, paths, scores, LABELS, top_k=5, workers=args.workers)
                write_s = time.perf_counter() - started
                size = page.stat().st_size
                results[count] = {"write_s": write_s, "images_per_s": count / write_s, "bytes": size,
                                  "bytes_per_image": size / count, **open_and_scroll(browser, page)}
                print(json.dumps({"images": count, **{k: round(v, 3) if isinstance(v, float) else v
                                                      for k, v in results[count].items()}}), flush=True)
    finally:
        browser.close()
    small, large = min(results), max(results)
    if small != large:
        print(f"ratios {large} / {small} images ({large / small:.0f}x the images):")
        for key in ("write_s", "bytes", "open_s", "cards_at_open", "js_heap_mb"):
            print(f"  {key:<14} {results[large][key] / results[small][key]:6.2f}")
    print(f"README bound per image: {report.THUMBNAIL_MAX_BYTES * 4 // 3 + 400} bytes; "
          f"largest measured: {max(r['bytes_per_image'] for r in results.values()):.0f}")


if __name__ == "__main__":
    main()
