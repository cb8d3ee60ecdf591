"""`clip eval` against cli-contract.md: the ImageFolder layout, --class-names, CLIP_benchmark's metrics checked against
a reference computed here from transformers' probabilities on the same tiny checkpoint, the formats, failures and the
index (three template sets cost the model one pass over the images)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipcli.evaluate import compute_metrics
from tests.conftest import assert_usage_error, photo
from tests.test_cli import TWO_TEMPLATES, Reference, assert_click_usage_error, invoke

# Six classes (so acc5 is defined), in folder-name order; their label text comes from --class-names except for the
# last folder, which keeps its name.
FOLDERS = ["c0", "c1", "c2", "c3", "c4", "tree"]
NAMES = {"c0": "red car", "c1": "rocket ship", "c2": "cat", "c3": "a dog, sitting", "c4": "small boat"}
LABELS = [NAMES.get(folder, folder) for folder in FOLDERS]
EMPTY, ONE = 5, 4  # class indices: no images at all; exactly one image


def sample_images(folder: Path, count: int) -> list[Path]:
    """`count` small images of varied kinds (flat colour, noise, photo-like, stripes), so that the tiny random model
    does not give them all the same label."""
    rng = np.random.default_rng(7)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            image = Image.new("RGB", (32, 32), tuple(int(v) for v in rng.integers(0, 256, 3)))
        elif kind == 1:
            image = Image.fromarray(rng.integers(0, 256, (30, 34, 3), dtype=np.uint8))
        elif kind == 2:
            image = photo(36, 28, seed=i)
        else:
            stripes = np.zeros((32, 32, 3), np.uint8)
            stripes[:: 2 + i % 3, :, i % 3] = 255
            image = Image.fromarray(stripes)
        path = folder / f"img{i:02d}.png"
        image.save(path)
        paths.append(path)
    return paths


@dataclass(frozen=True)
class Layout:
    root: Path
    names_file: Path
    paths: list[str]  # as clip names them, sorted
    targets: np.ndarray
    never_predicted: int  # a class with images that no image is predicted as


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, reference: Reference) -> Layout:
    """A labelled folder built from the reference's own predictions, so that whatever the random weights predict it
    has: a class with images that is never predicted, a class with one image, an empty class, right and wrong
    predictions, and labels that only --class-names gives."""
    base = tmp_path_factory.mktemp("eval")
    staged = sample_images(base / "staged", 14)
    predicted = reference.probs([str(p) for p in staged], LABELS).argmax(-1)
    never = [c for c in range(len(LABELS)) if c not in set(predicted) and c not in (EMPTY, ONE)]
    assert never, f"every class was predicted ({predicted}); pick other sample images"
    unseen = never[0]
    usable = [c for c in range(len(LABELS)) if c not in (EMPTY, ONE, unseen)]
    targets = []
    for i, pred in enumerate(predicted):
        if i == 0:
            target = ONE
        elif i in (1, 2):
            target = unseen
        elif pred in usable and i % 3:
            target = int(pred)  # right
        else:
            others = [c for c in usable if c != pred]
            target = others[i % len(others)]  # wrong
        targets.append(target)
    assert set(targets) == set(range(len(LABELS))) - {EMPTY}, targets
    root = base / "data"
    for folder in FOLDERS:
        (root / folder).mkdir(parents=True)
    placed = {}
    for path, target in zip(staged, targets, strict=True):
        sub = root / FOLDERS[target] / ("nested" if target == unseen else "")  # class folders are walked
        sub.mkdir(exist_ok=True)
        shutil.copy(path, sub / path.name)
        placed[str(sub / path.name)] = target
    names_file = base / "names.tsv"
    names_file.write_text("".join(f"{folder}\t{label}\n" for folder, label in NAMES.items()), encoding="utf-8")
    paths = sorted(placed)
    return Layout(root, names_file, paths, np.array([placed[p] for p in paths]), unseen)


def reference_metrics(probs: np.ndarray, targets: np.ndarray, classes: int) -> dict:
    """CLIP_benchmark's definitions written out plainly: top-k accuracy as in its accuracy(), mean per-class recall
    as sklearn's balanced_accuracy_score (recall averaged over the classes present in the true labels)."""
    predicted = probs.argmax(-1)
    top5 = np.argsort(-probs, axis=-1)[:, :5]
    confusion = [[0] * classes for _ in range(classes)]
    for t, p in zip(targets, predicted, strict=True):
        confusion[t][p] += 1
    present = sorted(set(targets.tolist()))
    recall = {c: float(np.mean(predicted[targets == c] == c)) for c in present}
    precision = {c: float(np.mean(targets[predicted == c] == c)) for c in set(predicted.tolist())}
    return {
        "acc1": float(np.mean(predicted == targets)),
        "acc5": float(np.mean([t in row for t, row in zip(targets, top5, strict=True)])) if classes >= 5 else None,
        "mean_per_class_recall": float(np.mean(list(recall.values()))),
        "recall": [recall.get(c) for c in range(classes)],
        "precision": [precision.get(c) for c in range(classes)],
        "confusion": confusion,
    }


def eval_args(layout: Layout, model: Path, *extra: object) -> list[object]:
    return ["eval", layout.root, "--class-names", layout.names_file, "-m", model, "--no-index", *extra]


# ---------------------------------------------------------------------------------------------------------------
# metrics


def test_metrics_match_an_independent_reference(tiny_model_dir, dataset, reference):
    result = invoke(*eval_args(dataset, tiny_model_dir, "-f", "json"))
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert result.stderr == ""
    got = json.loads(result.stdout)
    probs = reference.probs(dataset.paths, LABELS)
    want = reference_metrics(probs, dataset.targets, len(LABELS))
    assert got["labels"] == LABELS
    assert got["n"] == len(dataset.paths) == 14
    assert got["errors"] == []
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert got["confusion_matrix"] == want["confusion"]
    assert list(got["per_class_recall"].values()) == pytest.approx(want["recall"])
    assert list(got["per_class_precision"].values()) == pytest.approx(want["precision"])
    assert list(got["per_class_recall"]) == list(got["per_class_precision"]) == list(got["support"]) == LABELS
    assert list(got["support"].values()) == np.bincount(dataset.targets, minlength=len(LABELS)).tolist()
    # The cases the dataset was built to have:
    assert got["support"][LABELS[ONE]] == 1
    assert got["support"][LABELS[EMPTY]] == 0 and got["per_class_recall"][LABELS[EMPTY]] is None  # not in the mean
    unseen = LABELS[dataset.never_predicted]
    assert got["per_class_recall"][unseen] == 0 and got["per_class_precision"][unseen] is None
    defined = [v for v in got["per_class_recall"].values() if v is not None]
    assert len(defined) == 5 and got["mean_per_class_recall"] == pytest.approx(np.mean(defined))
    assert 0 < got["acc1"] < 1  # some right, some wrong


def test_compute_metrics_follows_clip_benchmark_on_small_cases():
    # 4 classes: acc5 is undefined (CLIP_benchmark: NaN below 5 classes); class 3 has no images but is predicted
    # once, so it has a precision (0) and no recall, and stays out of the mean (sklearn's balanced accuracy).
    scores = np.array([[.9, .1, 0, 0], [.2, .7, .1, 0], [.1, .8, .1, 0], [0, .1, .2, .7], [.6, .3, .1, 0]])
    targets = np.array([0, 0, 1, 2, 2])
    m = compute_metrics(scores, targets, ["a", "b", "c", "d"])
    assert m.n == 5 and m.acc1 == pytest.approx(2 / 5) and m.acc5 is None
    assert m.recall == [0.5, 1.0, 0.0, None]
    assert m.precision == [0.5, 0.5, None, 0.0]
    assert m.mean_per_class_recall == pytest.approx((0.5 + 1 + 0) / 3)
    assert m.confusion.tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 0, 1], [0, 0, 0, 0]]
    # 6 classes: acc5 counts the true class anywhere in the five best.
    six = np.array([[.5, .2, .1, .1, .06, .04], [.04, .06, .1, .1, .2, .5]])
    m6 = compute_metrics(six, np.array([4, 0]), list("abcdef"))
    assert m6.acc1 == 0 and m6.acc5 == 0.5  # class 4 is 5th for the first image; class 0 is 6th for the second
    # No images at all: nothing is defined.
    empty = compute_metrics(np.zeros((0, 3)), np.zeros(0, dtype=int), ["a", "b", "c"])
    assert (empty.n, empty.acc1, empty.acc5, empty.mean_per_class_recall) == (0, None, None, None)
    assert empty.recall == [None] * 3 and empty.confusion.tolist() == [[0] * 3] * 3


def test_acc5_is_null_below_five_classes(tiny_model_dir, tmp_path):
    root = tmp_path / "four"
    for number, folder in enumerate(["cat", "dog", "red car", "tree"]):
        sample_images(root / folder, 2 + number)
    result = invoke("eval", root, "-m", tiny_model_dir, "-f", "json")
    assert result.exit_code == 0, (result.stderr, result.exception)
    got = json.loads(result.stdout)
    assert got["labels"] == ["cat", "dog", "red car", "tree"]  # folder names, sorted, are the labels
    assert got["n"] == 14 and got["acc5"] is None and got["acc1"] is not None
    table = invoke("eval", root, "-m", tiny_model_dir)
    assert table.exit_code == 0
    assert "acc5                   -  (needs at least 5 classes)" in table.stdout


# ---------------------------------------------------------------------------------------------------------------
# formats


def test_table_and_csv_say_what_json_says(tiny_model_dir, dataset):
    as_json = json.loads(invoke(*eval_args(dataset, tiny_model_dir, "-f", "json")).stdout)
    table = invoke(*eval_args(dataset, tiny_model_dir))
    assert table.exit_code == 0 and table.stderr == ""
    lines = table.stdout.splitlines()
    assert lines[0] == "images                 14 in 6 classes"
    assert lines[1] == f"acc1                   {as_json['acc1']:.4f}"
    assert lines[2] == f"acc5                   {as_json['acc5']:.4f}"
    assert lines[3].startswith(f"mean_per_class_recall  {as_json['mean_per_class_recall']:.4f}")
    assert "(over the 5 classes with images)" in lines[3]
    for number, (label, row) in enumerate(zip(LABELS, as_json["confusion_matrix"], strict=True), 1):
        assert any(line.split() == [str(number), *label.split(), *map(str, row)] for line in lines), label
    as_csv = invoke(*eval_args(dataset, tiny_model_dir, "-f", "csv"))
    assert as_csv.exit_code == 0 and as_csv.stderr == ""
    rows = list(csv.reader(io.StringIO(as_csv.stdout)))
    assert rows[0] == ["label", "images", "recall", "precision", *(f"predicted:{label}" for label in LABELS)]
    for label, row, matrix_row in zip(LABELS, rows[1:], as_json["confusion_matrix"], strict=True):
        assert row[0] == label and int(row[1]) == as_json["support"][label]
        recall = as_json["per_class_recall"][label]
        assert row[2] == ("" if recall is None else f"{recall:.4f}")
        assert [int(v) for v in row[4:]] == matrix_row


@pytest.mark.parametrize("columns", [32, 200])
def test_table_fits_the_terminal(tiny_model_dir, dataset, columns):
    # cli-contract.md, Output files and streams: the table fits the terminal's width when stdout is one.
    from rich.cells import cell_len

    from tests.test_io import needs_installed, run_in_terminal

    needs_installed()
    lines = run_in_terminal(eval_args(dataset, tiny_model_dir), columns, dataset.root)
    assert lines and all(cell_len(line) <= columns for line in lines), [cell_len(line) for line in lines]
    assert lines[1].startswith("acc1") and any(line.startswith(("small boat", "smal…")) for line in lines)
    assert any(line.startswith("confusion matrix") for line in lines)
    assert any("…" in line for line in lines) == (columns == 32)


def test_a_confusion_matrix_wider_than_the_terminal_is_left_to_other_formats():
    from clipcli.evaluate import compute_metrics
    from clipcli.output import render_eval

    labels = [f"class number {i}" for i in range(12)]
    scores = np.eye(12)[[i % 12 for i in range(30)]]
    summary = {**compute_metrics(scores, np.arange(30) % 12, labels).to_json(), "errors": []}
    narrow = render_eval(summary, "table", width=30).splitlines()
    assert all(len(line) <= 30 for line in narrow)
    assert any(line.startswith("confusion matrix: 12 x 12") for line in narrow)
    wide = render_eval(summary, "table", width=120).splitlines()
    assert any(line.startswith("confusion matrix (rows") for line in wide) and max(map(len, wide)) <= 120
    assert render_eval(summary, "table") == render_eval(summary, "table", width=None)  # files: nothing cut


def test_output_file_is_written_whole(tiny_model_dir, dataset, tmp_path):
    target = tmp_path / "metrics.json"
    result = invoke(*eval_args(dataset, tiny_model_dir, "-f", "json", "-o", target))
    assert result.exit_code == 0 and result.stdout == "" and result.stderr == ""
    assert json.loads(target.read_text())["n"] == 14
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_templates_change_the_scores(tiny_model_dir, dataset, reference):
    result = invoke(*eval_args(dataset, tiny_model_dir, "-t", TWO_TEMPLATES[0], "-t", TWO_TEMPLATES[1], "-f", "json"))
    assert result.exit_code == 0, result.stderr
    probs = reference.probs(dataset.paths, LABELS, TWO_TEMPLATES)
    want = reference_metrics(probs, dataset.targets, len(LABELS))
    got = json.loads(result.stdout)
    assert got["confusion_matrix"] == want["confusion"]
    assert got["acc5"] == pytest.approx(want["acc5"])


# ---------------------------------------------------------------------------------------------------------------
# failures, warnings, usage errors


def test_unreadable_images_are_reported_and_the_rest_evaluated(tiny_model_dir, tmp_path):
    root = tmp_path / "data"
    sample_images(root / "cat", 3)
    sample_images(root / "dog", 2)
    (root / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    photo(20, 20).save(root / "loose.png")  # in no class folder
    (root / ".hidden").mkdir()  # not a class
    result = invoke("eval", root, "-m", tiny_model_dir, "-f", "json")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"warning: 1 image(s) directly in '{root}' belong to no class folder and were left out",
        f"{root}/dog/broken.jpg: not an image file",
        "1 input(s) failed; the others were processed"]
    got = json.loads(result.stdout)
    assert got["n"] == 5 and got["labels"] == ["cat", "dog"]
    assert got["errors"] == [{"path": f"{root}/dog/broken.jpg", "error": "not an image file"}]


def test_exclude_and_max_megapixels_apply_to_the_dataset(tiny_model_dir, tmp_path, monkeypatch):
    # cli-contract.md, Inputs: --exclude drops files and folders during the walk (patterns as for every command: a
    # name, or a path under DATASET); a class folder it drops is no class. --max-megapixels lets large images in.
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # --max-megapixels sets it process-wide
    root = tmp_path / "data"
    sample_images(root / "cat", 2)
    sample_images(root / "dog" / "raw", 2)
    sample_images(root / "dog", 1)
    sample_images(root / "drafts", 1)
    (root / "cat" / "x.tmp.png").write_bytes((root / "cat" / "img00.png").read_bytes())
    Image.new("RGB", (3000, 2000), (10, 200, 30)).save(root / "cat" / "wide.png")  # 6 megapixels
    result = invoke("eval", root, "-m", tiny_model_dir, "-f", "json", "--exclude", "*.tmp.png", "--exclude",
                    "dog/raw/", "--exclude", "drafts", "--max-megapixels", "1")
    assert result.exit_code == 1, (result.stderr, result.exception)
    got = json.loads(result.stdout)
    assert got["labels"] == ["cat", "dog"] and got["support"] == {"cat": 2, "dog": 1}
    assert [row["path"] for row in got["errors"]] == [f"{root}/cat/wide.png"]
    larger = invoke("eval", root, "-m", tiny_model_dir, "-f", "json", "--exclude", "*.tmp.png", "--exclude",
                    "dog/raw/", "--exclude", "drafts", "--max-megapixels", "10")
    assert larger.exit_code == 0, (larger.stderr, larger.exception)
    assert json.loads(larger.stdout)["support"] == {"cat": 3, "dog": 1}


@pytest.mark.parametrize(("setup", "args", "fragments"), [
    ("none", [], ["DATASET", "does not exist"]),
    ("file", [], ["is not a folder", "one subfolder of images per class"]),
    ("flat", [], ["has no class folders"]),
    ("tree", ["--class-names", "{names}"], ["--class-names", "line 2 has no tab", "folder<TAB>label"]),
    ("tree", ["--class-names", "{unknown}"], ["--class-names", "names none of the class folders", "'zebra'"]),
    ("tree", ["--class-names", "{same}"], ["--class-names", "would both be labelled 'pet'"]),
    ("tree", ["--class-names", "{missing}"], ["--class-names", "does not exist"]),
    ("tree", ["-t", "no placeholder"], ["--template", "has no {}"]),
])
def test_usage_errors(tiny_model_dir, tmp_path, setup, args, fragments):
    root = tmp_path / "data"
    if setup == "file":
        root.write_bytes(b"x")
    elif setup == "flat":
        root.mkdir()
        photo(20, 20).save(root / "a.png")
    elif setup == "tree":
        sample_images(root / "cat", 1)
        sample_images(root / "dog", 1)
    files = {"names": "cat\tkitten\ndog pup\n", "unknown": "zebra\tstripes\n", "same": "cat\tpet\ndog\tpet\n"}
    for name, text in files.items():
        (tmp_path / f"{name}.tsv").write_text(text)
    args = [a.format(**{n: tmp_path / f"{n}.tsv" for n in [*files, "missing"]}) for a in args]
    result = invoke("eval", root, *args, "-m", tiny_model_dir)
    assert_usage_error(result, *fragments)


def test_class_names_for_a_larger_dataset_are_used_for_the_folders_present(tiny_model_dir, dataset, tmp_path):
    # A names file made for the whole dataset (e.g. all of ImageNet's classes) on a subset of its folders: the lines
    # of the folders present are used, the others are named in one warning.
    larger = tmp_path / "larger.tsv"
    larger.write_text(dataset.names_file.read_text(encoding="utf-8") + "zebra\tstriped horse\nyak\thairy ox\n",
                      encoding="utf-8")
    want = invoke(*eval_args(dataset, tiny_model_dir, "-f", "json"))
    result = invoke("eval", dataset.root, "--class-names", larger, "-m", tiny_model_dir, "--no-index", "-f", "json")
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert result.stdout == want.stdout and json.loads(result.stdout)["labels"] == LABELS
    warnings = [line for line in result.stderr.splitlines() if "--class-names" in line]
    assert len(warnings) == 1 and "2 folder(s)" in warnings[0] and "'zebra'" in warnings[0], result.stderr
    assert "--class-names" not in want.stderr


def test_format_must_be_one_eval_has(tiny_model_dir, dataset):
    assert_click_usage_error(invoke(*eval_args(dataset, tiny_model_dir, "-f", "yaml")), "yaml")


@pytest.mark.parametrize(("name", "fmt"), [("m.json", "json"), ("m.JSONL", "jsonl"), ("m.csv", "csv"),
                                           ("m.txt", "table")])
def test_the_output_name_picks_the_format(tiny_model_dir, dataset, tmp_path, name, fmt):
    # As for classify and search (cli-contract.md, "Output files and streams"): without --format, -o's extension
    # chooses; jsonl is the json object on one line.
    want = invoke(*eval_args(dataset, tiny_model_dir, "-f", fmt)).stdout
    result = invoke(*eval_args(dataset, tiny_model_dir, "-o", tmp_path / name))
    assert result.exit_code == 0 and result.stdout == "", (result.stderr, result.exception)
    assert (tmp_path / name).read_text() == want
    if fmt == "jsonl":
        assert want.count("\n") == 1 and json.loads(want) == json.loads(
            invoke(*eval_args(dataset, tiny_model_dir, "-f", "json")).stdout)


def test_a_format_that_contradicts_the_output_name_is_refused(tiny_model_dir, dataset, tmp_path):
    assert_usage_error(invoke(*eval_args(dataset, tiny_model_dir, "-o", tmp_path / "m.json", "-f", "csv")),
                       "--format", "m.json")
    assert not (tmp_path / "m.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# the index: one pass of the model over the images, whatever the templates


def test_three_template_sets_cost_the_model_one_pass(tiny_model_dir, dataset, tmp_path):
    from clipcli import evaluate
    from clipcli.index import Index
    from clipcli.pipeline import Session, Settings

    data = evaluate.find_dataset(str(dataset.root), NAMES)
    settings = Settings(model=str(tiny_model_dir), device="cpu")
    index = Index(tmp_path / "index.db", lambda message: pytest.fail(message))
    try:
        session = Session(settings, index)
        results = [evaluate.evaluate(session, data, templates) for templates in
                   (["a photo of a {}."], TWO_TEMPLATES, ["itap of a {}.", "a {} in a video game."])]
        assert session.computed_images == len(dataset.paths)  # the first template set computed them; then the index
        assert results[0].metrics.confusion.tolist() != results[1].metrics.confusion.tolist() or \
            not np.allclose(results[0].scores, results[1].scores)
        again = Session(settings, index)  # a later run (a new process) finds them too
        rerun = evaluate.evaluate(again, data, TWO_TEMPLATES)
        assert again.computed_images == 0
        np.testing.assert_allclose(rerun.scores, results[1].scores, atol=1e-6)
    finally:
        index.close()


def test_a_run_answered_from_the_index_imports_no_torch(tiny_model_dir, dataset, tmp_path):
    # The second run finds every image and prompt in the index: metrics and the HTML report need no model.
    import subprocess
    import sys

    index = tmp_path / "index.db"
    args = ["eval", str(dataset.root), "--class-names", str(dataset.names_file), "-m", str(tiny_model_dir),
            "--index", str(index), "-q"]
    first = invoke(*args, "-f", "json")
    assert first.exit_code == 0, first.stderr
    script = ("import sys; from clipcli.cli import main; sys.argv = ['clip', *sys.argv[1:]]\n"
              "try:\n    main()\nexcept SystemExit as exit:\n    code = exit.code\n"
              "print('torch' in sys.modules, code, file=sys.stderr)")
    for extra in (["-f", "json"], ["-o", str(tmp_path / "warm.html")]):
        warm = subprocess.run([sys.executable, "-c", script, *args, *extra], capture_output=True, text=True,
                              timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert warm.stderr.splitlines()[-1] == "False 0", warm.stderr
        if extra[0] == "-f":
            assert json.loads(warm.stdout) == json.loads(first.stdout)
    assert (tmp_path / "warm.html").stat().st_size > 0
