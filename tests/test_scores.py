"""`clip classify --score prob|cosine` and `--min-score` against cli-contract.md ("`clip classify` scores"): cosines
and probabilities checked against transformers' CLIPModel on the same tiny checkpoint, in every output format."""

from __future__ import annotations

import csv
import io
import math
import re

import numpy as np
import pytest
import torch

from clipcli import pipeline, scoring
from clipcli.errors import UsageError
from tests.conftest import assert_usage_error
from tests.test_cli import (
    LABELS,
    PROB_ATOL,
    TWO_TEMPLATES,
    Reference,
    assert_click_usage_error,
    expected_paths,
    invoke,
    parse,
    unit,
)


@torch.no_grad()
def reference_cosines(reference: Reference, paths: list[str], labels: list[str],
                      templates: list[str] = ("a photo of a {}.",)) -> np.ndarray:
    """(N, L) cosines: with one template CLIPModel's logits_per_image / logit_scale.exp(); several are ensembled."""
    if len(templates) == 1:
        prompts = [templates[0].replace("{}", label) for label in labels]
        out = reference.model(pixel_values=reference.pixels(paths), **reference.texts(prompts))
        return (out.logits_per_image / reference.model.logit_scale.exp()).numpy()
    prompts = [t.replace("{}", label) for label in labels for t in templates]
    text = unit(torch.from_numpy(reference.text_features(prompts))).reshape(len(labels), len(templates), -1)
    text = unit(text.mean(dim=1))
    return (unit(torch.from_numpy(reference.image_features(paths))) @ text.T).numpy()


def rows_of(fmt: str, stdout: str, labels: list[str]) -> list[dict]:
    """csv/json/jsonl rows; csv's empty label read as None, like json's null."""
    rows = parse(fmt, stdout, labels)
    if fmt == "csv":
        for row, raw in zip(rows, list(csv.reader(io.StringIO(stdout)))[1:], strict=True):
            row["label"] = raw[1] or None
    return rows


@pytest.mark.parametrize("fmt", ["csv", "json", "jsonl"])
def test_cosine_scores_match_transformers(tiny_model_dir, in_images_parent, reference, fmt):
    result = invoke("classify", in_images_parent, "-l", ",".join(LABELS), "--score", "cosine", "-f", fmt,
                    "-m", tiny_model_dir)
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert result.stderr == ""
    paths = expected_paths(in_images_parent)
    want = reference_cosines(reference, paths, LABELS)
    rows = rows_of(fmt, result.stdout, LABELS)
    assert [r["path"] for r in rows] == paths
    got = np.array([[r["scores"][label] for label in LABELS] for r in rows])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert [r["label"] for r in rows] == [LABELS[i] for i in want.argmax(-1)]
    np.testing.assert_allclose([r["score"] for r in rows], want.max(-1), atol=1e-5, rtol=0)
    # Cosines are not probabilities: each label is scored on its own, so rows need not sum to 1.
    assert not np.allclose(got.sum(-1), 1, atol=1e-2)


@pytest.mark.parametrize("score", ["prob", "cosine"])
def test_csv_scores_are_the_float32_scores_of_json(tiny_model_dir, in_images_parent, score):
    # csv is for programs: its numbers give back exactly the float32 scores that json holds.
    common = ["classify", in_images_parent, "-l", ",".join(LABELS), "--score", score, "-m", tiny_model_dir]
    rows = {fmt: rows_of(fmt, invoke(*common, "-f", fmt).stdout, LABELS) for fmt in ("csv", "json")}
    got = np.array([[r["score"], *r["scores"].values()] for r in rows["csv"]], dtype=np.float32)
    want = np.array([[r["score"], *r["scores"].values()] for r in rows["json"]], dtype=np.float32)
    assert got.shape == (len(expected_paths(in_images_parent)), 1 + len(LABELS))
    np.testing.assert_array_equal(got, want)


def test_cosine_scores_with_a_template_ensemble(tiny_model_dir, in_images_parent, reference):
    args = [a for t in TWO_TEMPLATES for a in ("-t", t)]
    result = invoke("classify", in_images_parent, "-l", ",".join(LABELS), *args, "--score", "cosine", "-f", "jsonl",
                    "-m", tiny_model_dir)
    assert result.exit_code == 0 and result.stderr == "", (result.stderr, result.exception)
    paths = expected_paths(in_images_parent)
    got = np.array([[r["scores"][label] for label in LABELS] for r in rows_of("jsonl", result.stdout, LABELS)])
    np.testing.assert_allclose(got, reference_cosines(reference, paths, LABELS, TWO_TEMPLATES), atol=1e-5, rtol=0)


def test_score_prob_is_the_default(tiny_model_dir, in_images_parent, reference):
    args = ("classify", in_images_parent, "-l", ",".join(LABELS), "-f", "jsonl", "-m", tiny_model_dir)
    default, explicit = invoke(*args), invoke(*args, "--score", "prob")
    assert default.exit_code == explicit.exit_code == 0
    assert default.stdout == explicit.stdout
    got = np.array([[r["scores"][label] for label in LABELS] for r in rows_of("jsonl", default.stdout, LABELS)])
    np.testing.assert_allclose(got, reference.probs(expected_paths(in_images_parent), LABELS), atol=PROB_ATOL, rtol=0)


def threshold_between(top: np.ndarray) -> float:
    """A threshold with some images above and some below it (top scores sorted, the middle gap)."""
    ordered = np.sort(top)
    middle = len(ordered) // 2
    assert ordered[middle - 1] < ordered[middle], "the test images need distinct top scores"
    return float((ordered[middle - 1] + ordered[middle]) / 2)


@pytest.mark.parametrize("score", ["prob", "cosine"])
@pytest.mark.parametrize("fmt", ["table", "csv", "json", "jsonl"])
def test_min_score_leaves_low_images_without_a_label(tiny_model_dir, in_images_parent, reference, score, fmt):
    paths = expected_paths(in_images_parent)
    want = (reference.probs(paths, LABELS) if score == "prob" else reference_cosines(reference, paths, LABELS))
    cut = threshold_between(want.max(-1))
    below = want.max(-1) < cut
    assert below.any() and not below.all()
    result = invoke("classify", in_images_parent, "-l", ",".join(LABELS), "--score", score, "--min-score", cut,
                    "-f", fmt, "-m", tiny_model_dir)
    assert result.exit_code == 0 and result.stderr == "", (result.stderr, result.exception)
    if fmt == "table":
        for path, row, low in zip(paths, want, below, strict=True):
            (line,) = [line for line in result.stdout.splitlines() if path in line]
            cells = re.split(r" {2,}", line.strip())  # columns are two or more spaces apart
            top = LABELS[int(row.argmax())]
            if low:
                assert cells[1] == "-", line
            else:
                shown = f"{100 * row.max():.1f}%" if score == "prob" else f"{row.max():.3f}"
                assert cells[1].startswith(top + " "), line
                assert abs(float(cells[1].split()[-1].rstrip("%")) - float(shown.rstrip("%"))) <= 0.0011 * (
                    100 if score == "prob" else 1), (cells[1], shown)
        return
    rows = rows_of(fmt, result.stdout, LABELS)
    if fmt in ("json", "jsonl"):
        assert all("label" in r for r in rows)  # present, as null, when there is none
    for r, row, low in zip(rows, want, below, strict=True):
        assert r["label"] == (None if low else LABELS[int(row.argmax())])
        # Scores are still given in full for an image without a label; its score is its top score.
        got = np.array([r["scores"][label] for label in LABELS])
        np.testing.assert_allclose(got, row, atol=PROB_ATOL if score == "prob" else 1e-5, rtol=0)
        assert r["score"] == pytest.approx(row.max(), abs=PROB_ATOL)


def test_min_score_edge_is_inclusive(tiny_model_dir, in_images_parent):
    # An image whose top score equals the threshold keeps its label: only scores below it lose theirs.
    result = invoke("classify", in_images_parent, "-l", ",".join(LABELS), "-f", "jsonl", "-m", tiny_model_dir)
    rows = rows_of("jsonl", result.stdout, LABELS)
    lowest = min(rows, key=lambda r: r["score"])
    again = invoke("classify", in_images_parent, "-l", ",".join(LABELS), "-f", "jsonl", "--min-score",
                   repr(lowest["score"]), "-m", tiny_model_dir)
    assert again.exit_code == 0
    assert [r["label"] for r in rows_of("jsonl", again.stdout, LABELS)] == [r["label"] for r in rows]
    bounds = invoke("classify", in_images_parent, "-l", ",".join(LABELS), "-f", "jsonl", "--min-score", "1",
                    "-m", tiny_model_dir)
    assert [r["label"] for r in rows_of("jsonl", bounds.stdout, LABELS)] == [None] * len(rows)


def test_one_label_with_prob_warns(tiny_model_dir, in_images_parent):
    result = invoke("classify", in_images_parent, "-l", "cat", "-f", "jsonl", "-m", tiny_model_dir)
    assert result.exit_code == 0
    (line,) = result.stderr.splitlines()
    assert line.startswith("warning: ") and "100%" in line and "--score cosine" in line
    assert all(r["score"] == 1 for r in rows_of("jsonl", result.stdout, ["cat"]))
    explicit = invoke("classify", in_images_parent, "-l", "cat", "--score", "prob", "-f", "jsonl",
                      "-m", tiny_model_dir)
    assert explicit.stderr == result.stderr
    cosine = invoke("classify", in_images_parent, "-l", "cat", "--score", "cosine", "-f", "jsonl",
                    "-m", tiny_model_dir)
    assert cosine.exit_code == 0 and cosine.stderr == ""
    assert all(-1 <= r["score"] < 1 for r in rows_of("jsonl", cosine.stdout, ["cat"]))
    two = invoke("classify", in_images_parent, "-l", "cat,dog", "-f", "jsonl", "-m", tiny_model_dir)
    assert two.exit_code == 0 and two.stderr == ""


@pytest.mark.parametrize("args, fragments", [
    (["--min-score", "50"], ["--min-score '50.0'", "between 0 and 1", "probability"]),
    (["--min-score", "-0.1"], ["--min-score", "between 0 and 1"]),
    (["--score", "cosine", "--min-score", "1.5"], ["--min-score '1.5'", "between -1 and 1", "cosine"]),
    (["--min-score", "nan"], ["--min-score 'nan'"]),
])
def test_min_score_out_of_range_is_a_usage_error(tiny_model_dir, image_folder, args, fragments):
    assert_usage_error(invoke("classify", image_folder, "-l", "cat,dog", *args, "-m", tiny_model_dir), *fragments)


def test_unknown_score_is_a_usage_error(tiny_model_dir, image_folder):
    assert_click_usage_error(invoke("classify", image_folder, "-l", "cat,dog", "--score", "logit",
                                    "-m", tiny_model_dir), "--score", "logit", "cosine")


def test_help_names_the_score_options():
    result = invoke("classify", "--help")
    assert result.exit_code == 0
    for option in ("--score", "prob", "cosine", "--min-score"):
        assert option in result.stdout


# ---------------------------------------------------------------------------------------------------------------
# the library


def test_top_labels():
    scores = np.array([[0.2, 0.5, 0.3], [0.4, 0.4, 0.2], [0.1, 0.1, 0.1]], dtype=np.float32)
    assert scoring.top_labels(scores).tolist() == [1, 0, 0]  # the first of equal scores
    assert scoring.top_labels(scores, 0.4).tolist() == [1, 0, -1]  # a score equal to the threshold keeps its label
    assert scoring.top_labels(scores, float(np.float32(0.5))).tolist() == [1, -1, -1]
    assert scoring.top_labels(np.zeros((0, 3), np.float32), 0.5).tolist() == []


def test_pipeline_classify_score_kinds(tiny_model_dir, image_folder):
    from clipcli.pipeline import Session, Settings

    paths = [str(p) for p in sorted(image_folder.rglob("*")) if p.is_file()]
    session = Session(Settings(model=str(tiny_model_dir), device="cpu"))
    labels = pipeline.label_embeddings(session, LABELS, ["a photo of a {}."])
    probs = np.concatenate([b.scores for b in pipeline.classify(session, paths, labels)])
    cos = np.concatenate([b.scores for b in pipeline.classify(session, paths, labels, score="cosine")])
    assert probs.dtype == cos.dtype == np.float32
    scaled = cos * session.info.logit_scale
    expected = np.exp(scaled - scaled.max(-1, keepdims=True))
    np.testing.assert_allclose(probs, expected / expected.sum(-1, keepdims=True), atol=1e-6)
    with pytest.raises(UsageError, match="'logit'"):
        next(pipeline.classify(session, paths, labels, score="logit"))
    for kind, bad in (("prob", 1.01), ("prob", math.nan), ("cosine", -1.5)):
        with pytest.raises(UsageError, match="min_score"):
            pipeline.check_score(kind, bad)
    pipeline.check_score("cosine", -1.0)
    pipeline.check_score("prob", 0.0)


HOSTILE_LABELS = ['say "hi"', "back\\slash", "100%", "%s", "tab\tand\nnewline", "line\u2028sep", "nel\u0085",
                  "é ☃ 🐈", "\x00nul", "{}"]


@pytest.mark.parametrize("min_score", [None, 0.2])
@pytest.mark.parametrize("top_k", [1, 3, 20])
def test_jsonl_rows_are_encoded_as_json_encodes_the_records(tmp_path, top_k, min_score):
    """classify_jsonl (the fast encoder of jsonl rows) writes exactly what the records through json would: hostile
    labels and paths, labels left out by --min-score, top_k beyond the labels, negative, zero and non-finite
    scores."""
    from clipcli.output import JsonLine, RowWriter, classify_jsonl, classify_layout, classify_records

    rng = np.random.default_rng(7)
    scores = rng.uniform(-1, 1, (9, len(HOSTILE_LABELS))).astype(np.float32)
    scores[1] = 0.0
    scores[2, 0] = -0.0
    scores[3, 4] = np.nan
    scores[4, 1] = np.inf
    scores[5, :] = -np.inf
    scores[6] = 1e-30
    paths = ["a.jpg", 'q"uote.jpg', "new\nline.jpg", "ls\u2028.jpg", "bad-\udcff.jpg", "dir/é.png", "\\b.png",
             "%d.png", "/abs/x.JPG"]
    fast = classify_jsonl(paths, scores, HOSTILE_LABELS, top_k, min_score)
    slow = classify_records(paths, scores, HOSTILE_LABELS, top_k, min_score)
    assert all(isinstance(line, JsonLine) for line in fast)
    written = []
    for name, records in (("fast.jsonl", fast), ("slow.jsonl", slow)):
        with RowWriter(tmp_path / name, "jsonl", classify_layout(HOSTILE_LABELS, "cosine")) as writer:
            writer.write(records)
        written.append((tmp_path / name).read_bytes())
    assert written[0] == written[1]
    assert written[0].count(b"\n") == 9 and "\u2028".encode() not in written[0] and "\u0085".encode() not in written[0]
    with pytest.raises(ValueError, match="cannot be written as csv"):
        RowWriter(None, "csv", classify_layout(HOSTILE_LABELS, "cosine")).write(fast)


def test_cosines_to_one_query_scores_identical_rows_alike():
    rng = np.random.default_rng(3)
    query = scoring.normalize(rng.standard_normal((1, 512)).astype(np.float32))[0]
    for rows in (1, 3, 5, 7, 13, 300):
        features = rng.standard_normal((rows, 512)).astype(np.float32) * 3
        features[::2] = features[0]  # the same image at many places in the batch
        got = scoring.cosines_to(features, query)
        assert got.dtype == np.float32 and got.shape == (rows,)
        assert len(set(got[::2].tolist())) == 1
        np.testing.assert_allclose(got, scoring.cosines(features, query[None, :])[:, 0], atol=1e-6)
    assert scoring.cosines_to(np.zeros((0, 512), np.float32), query).shape == (0,)
