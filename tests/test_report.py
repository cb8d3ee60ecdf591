"""HTML reports (`-o NAME.html` for classify and eval) read as files: what they hold (checked against transformers on
the same tiny checkpoint), how they are written (atomically, through links), bounded thumbnails, and escaping. What
they look like and do in a browser is tests/test_report_browser.py."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipcli import report
from tests.conftest import photo
from tests.test_cli import LABELS, PROB_ATOL, expected_paths, invoke

HOSTILE_LABEL = '"><img src=x onerror="window.__pwned=1">'
SCRIPT_LABEL = "</script><script>window.__pwned=2</script>"


def report_data(page: str) -> tuple[dict, list[dict]]:
    """The two JSON blocks of a report page: its meta object and its list of images."""
    blocks = dict(re.findall(r'<script type="application/json" id="report-(\w+)">(.*?)</script>', page, re.S))
    return json.loads(blocks["meta"]), json.loads(blocks["images"])


# ---------------------------------------------------------------------------------------------------------------
# classify -o NAME.html


def test_classify_report_holds_every_image_with_its_scores(tiny_model_dir, in_images_parent, reference, tmp_path):
    target = tmp_path / "Report.HTML"  # the extension in any case
    result = invoke("classify", in_images_parent, "-l", ",".join(LABELS), "-k", "3", "-o", target,
                    "-m", tiny_model_dir)
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert result.stdout == "" and result.stderr == ""
    assert os.listdir(tmp_path) == ["Report.HTML"]  # one file, no temp files, no thumbnail folder
    meta, images = report_data(target.read_text(encoding="utf-8"))
    assert meta["kind"] == "classify" and meta["labels"] == LABELS and meta["threshold"] == report.LOW_CONFIDENCE
    paths = expected_paths(in_images_parent)
    want = reference.probs(paths, LABELS)
    assert sorted(im["p"] for im in images) == paths
    by_path = {im["p"]: im for im in images}
    for path, row in zip(paths, want, strict=True):
        top = by_path[path]["k"]
        assert [label for label, _ in top] == list(np.argsort(-row)[:3])  # top-k, best first
        np.testing.assert_allclose([score for _, score in top], np.sort(row)[::-1][:3], atol=PROB_ATOL)
        assert Image.open(io.BytesIO(base64.b64decode(by_path[path]["t"]))).size[0] <= report.THUMBNAIL_SIDE
        # A relative link from the report's folder to the image (no absolute path in the report).
        assert by_path[path]["u"] == os.path.relpath(os.path.abspath(path), tmp_path)
    # Grouped by top label (in label order), best first within a group.
    keys = [(im["k"][0][0], -im["k"][0][1]) for im in images]
    assert keys == sorted(keys)


def test_report_page_loads_nothing_and_runs_only_its_own_script(tiny_model_dir, in_images_parent, tmp_path):
    target = tmp_path / "r.html"
    assert invoke("classify", in_images_parent, "-l", "cat,dog", "-o", target, "-m", tiny_model_dir).exit_code == 0
    page = target.read_text(encoding="utf-8")
    assert not re.search(r"(?i)\b(src|href)\s*=\s*[\"']?(https?:|//)", page)
    assert "http://" not in page and "https://" not in page and "@import" not in page and "url(" not in page
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1)
    style = re.search(r"<style>(.*?)</style>", page, re.S).group(1)
    script = page.rsplit("<script>", 1)[1].split("</script>", 1)[0]
    for text in (style, script):
        digest = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp
    assert csp.startswith("default-src 'none'; img-src data:;") and "unsafe" not in csp


def test_hostile_paths_and_labels_stay_text(tiny_model_dir, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("<script>.jpg", "<img src=x onerror=alert(1)>.png", "a&amp;b.jpg"):
        photo(30, 30).save(folder / name, format="PNG" if name.endswith(".png") else "JPEG")
    target = tmp_path / "r.html"
    result = invoke("classify", folder, "-l", f"cat,{HOSTILE_LABEL},{SCRIPT_LABEL}", "-o", target,
                    "-m", tiny_model_dir)
    assert result.exit_code == 0, result.stderr
    page = target.read_text(encoding="utf-8")
    assert page.count("<script") == 3 and page.count("</script>") == 3  # the template's own, nothing more
    assert "<img" not in page and "onerror" in page  # the text is there, but only inside JSON strings
    meta, images = report_data(page)
    assert meta["labels"] == ["cat", HOSTILE_LABEL, SCRIPT_LABEL]  # exactly the text given, back from the JSON
    assert sorted(Path(im["p"]).name for im in images) == sorted(os.listdir(folder))
    assert all(im["u"].startswith("in/") and ":" not in im["u"] and "<" not in im["u"] for im in images)


def test_report_is_written_atomically_and_through_a_link(tiny_model_dir, in_images_parent, tmp_path, monkeypatch):
    real, link = tmp_path / "real.html", tmp_path / "link.html"
    real.write_text("old report")
    link.symlink_to(real)

    def broken(path: str) -> str:
        raise KeyboardInterrupt  # as if Ctrl-C came while thumbnails were being made

    made = report.thumbnail
    monkeypatch.setattr(report, "thumbnail", broken)
    result = invoke("classify", in_images_parent, "-l", "cat,dog", "-o", link, "-m", tiny_model_dir)
    assert result.exit_code == 130
    assert real.read_text() == "old report" and sorted(os.listdir(tmp_path)) == ["link.html", "real.html"]
    monkeypatch.setattr(report, "thumbnail", made)
    result = invoke("classify", in_images_parent, "-l", "cat,dog", "-o", link, "-m", tiny_model_dir)
    assert result.exit_code == 0, result.stderr
    assert link.is_symlink() and "report-meta" in real.read_text()
    assert sorted(os.listdir(tmp_path)) == ["link.html", "real.html"]


def test_failed_inputs_are_in_the_report_and_on_stderr(tiny_model_dir, image_folder, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    target = tmp_path / "r.html"
    result = invoke("classify", image_folder, broken, "-l", "cat,dog", "-o", target, "-m", tiny_model_dir)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [f"{broken}: not an image file",
                                          "1 input(s) failed; the others were processed"]
    meta, images = report_data(target.read_text())
    assert meta["failed"] == [{"p": str(broken), "r": "not an image file"}] and len(images) == 4


# ---------------------------------------------------------------------------------------------------------------
# thumbnails


def test_thumbnails_are_bounded_and_upright(tmp_path):
    noise = tmp_path / "noise.png"  # incompressible: the largest thumbnail an image can ask for
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1500, 1100, 3), dtype=np.uint8)).save(noise)
    encoded = report.thumbnail(str(noise))
    data = base64.b64decode(encoded)
    assert 0 < len(data) <= report.THUMBNAIL_MAX_BYTES
    assert max(Image.open(io.BytesIO(data)).size) <= report.THUMBNAIL_SIDE
    # A photo stored sideways with EXIF orientation 6 is shown upright (as browsers and the model see it).
    sideways = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    photo(200, 100).save(sideways, exif=exif.tobytes())
    upright = Image.open(io.BytesIO(base64.b64decode(report.thumbnail(str(sideways)))))
    assert upright.size == (64, 128)
    # A file that cannot be read gets no thumbnail, not an error.
    (tmp_path / "bad.jpg").write_bytes(b"junk")
    assert report.thumbnail(str(tmp_path / "bad.jpg")) == ""
    assert report.thumbnail(str(tmp_path / "gone.jpg")) == ""


# ---------------------------------------------------------------------------------------------------------------
# eval -o NAME.html


def test_eval_report_holds_the_metrics_and_the_truth(tiny_model_dir, tmp_path):
    from tests.test_eval import sample_images

    root = tmp_path / "data"
    for number, folder in enumerate(["cat", "dog", "tree"]):
        sample_images(root / folder, 2 + number)
    names = tmp_path / "names.tsv"
    names.write_text(f"cat\t{HOSTILE_LABEL}\n")
    target = tmp_path / "eval.html"
    result = invoke("eval", root, "--class-names", names, "-o", target, "-m", tiny_model_dir)
    assert result.exit_code == 0 and result.stdout == "" and result.stderr == "", result.stderr
    as_json = json.loads(invoke("eval", root, "--class-names", names, "-f", "json", "-m", tiny_model_dir).stdout)
    meta, images = report_data(target.read_text(encoding="utf-8"))
    assert meta["kind"] == "eval" and meta["labels"] == as_json["labels"] == [HOSTILE_LABEL, "dog", "tree"]
    assert meta["metrics"] == {k: v for k, v in as_json.items() if k != "errors"}
    truth = {"cat": 0, "dog": 1, "tree": 2}
    assert sorted((im["p"], im["y"]) for im in images) == sorted(
        (str(p), truth[p.parent.name]) for p in root.rglob("*.png"))
    confusion = np.zeros((3, 3), dtype=int)
    for im in images:
        confusion[im["y"], im["k"][0][0]] += 1
    assert confusion.tolist() == as_json["confusion_matrix"]


@pytest.mark.parametrize(("score", "min_score"), [("prob", "0.6"), ("cosine", "0.1"), ("cosine", None)])
def test_report_follows_score_and_min_score(tiny_model_dir, in_images_parent, reference, tmp_path, score,
                                           min_score):
    target = tmp_path / "r.html"
    extra = ["--min-score", min_score] if min_score else []
    result = invoke("classify", in_images_parent, "-l", ",".join(LABELS), "--score", score, *extra, "-o", target,
                    "-m", tiny_model_dir)
    assert result.exit_code == 0, result.stderr
    meta, images = report_data(target.read_text(encoding="utf-8"))
    assert meta["score"] == score
    # The low-confidence threshold is --min-score; without it, 0.5 for probabilities and none for cosines.
    assert meta["threshold"] == (float(min_score) if min_score else None)
    paths = expected_paths(in_images_parent)
    if score == "cosine":
        image = reference.image_features(paths)
        text = reference.text_features([f"a photo of a {label}." for label in LABELS])
        want = (image / np.linalg.norm(image, axis=-1, keepdims=True)) @ (
            text / np.linalg.norm(text, axis=-1, keepdims=True)).T
    else:
        want = reference.probs(paths, LABELS)
    for im in images:
        row = want[paths.index(im["p"])]
        np.testing.assert_allclose([s for _, s in im["k"]], np.sort(row)[::-1], atol=PROB_ATOL)
