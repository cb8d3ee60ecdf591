"""`clip search` and `clip duplicates` against cli-contract.md: rankings and groups equal a brute-force reference
computed from transformers' embeddings of the same tiny checkpoint, on a folder whose answer is known by
construction (an image and its resized, re-encoded and cropped copies among unlike images); ties in path order;
empty folders; long queries; unreadable images; combined queries; the warm --image path imports no torch. The
numpy core (search.TopK, search.duplicate_groups) is checked against plain brute force on random data."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from clipcli import search
from clipcli.errors import OptionError
from tests.conftest import assert_usage_error, make_hf_checkpoint, photo
from tests.test_cli import Reference, clip_env, invoke

COPIES = ["cropped.png", "orig.png", "reencoded.jpg", "resized.png"]  # sorted: the group known by construction
OTHERS = ["checker.png", "circle.png", "noise.png", "ramp.png", "red.png", "stripes.png"]


@pytest.fixture(scope="module")
def known(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image, its resized, re-encoded and lightly cropped copies, and six unlike images (noise, a checkerboard,
    a ramp, a circle, a flat colour, stripes). The tiny model puts the copies at cosine >= 0.999 of each other and
    everything else below 0.97 of them."""
    folder = tmp_path_factory.mktemp("known")
    original = photo(96, 72, seed=7)
    original.save(folder / "orig.png")
    original.resize((64, 48), Image.Resampling.BICUBIC).save(folder / "resized.png")
    original.save(folder / "reencoded.jpg", quality=75)
    original.crop((3, 2, 93, 70)).save(folder / "cropped.png")
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:72, 0:96]
    Image.fromarray(rng.integers(0, 256, (72, 96, 3), dtype=np.uint8)).save(folder / "noise.png")
    Image.fromarray(((x // 8 + y // 8) % 2 * 255).astype(np.uint8)).convert("RGB").save(folder / "checker.png")
    Image.fromarray(np.stack([(x * 2.6).astype(np.uint8)] * 3, -1)).save(folder / "ramp.png")
    circle = Image.new("RGB", (96, 72), (20, 40, 200))
    ImageDraw.Draw(circle).ellipse((20, 10, 70, 60), fill=(250, 220, 0))
    circle.save(folder / "circle.png")
    Image.new("RGB", (96, 72), (200, 30, 30)).save(folder / "red.png")
    Image.fromarray(np.stack([((y // 6) % 2 * 255).astype(np.uint8), np.zeros_like(y, np.uint8),
                              ((x // 5) % 2 * 200).astype(np.uint8)], -1)).save(folder / "stripes.png")
    return folder


@pytest.fixture(scope="module")
def embeddings(known: Path, reference: Reference) -> dict[str, np.ndarray]:
    """path (as `clip` names it) -> the reference's unit image embedding."""
    paths = sorted(str(p) for p in known.iterdir())
    return dict(zip(paths, unit(reference.image_features(paths)), strict=True))


def unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def run(*args: object, expect: int = 0):
    result = invoke(*args)
    assert result.exit_code == expect, (result.exit_code, result.stderr, result.exception)
    return result


def rows(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def assert_ranking(got: list[dict], scores: dict[str, float], k: int) -> None:
    """`got` is the reference's top k: the same scores at each rank (1e-5), each path scored as the reference scores
    it, and the order the reference's (best first, ties in path order) wherever its scores differ by over 1e-5."""
    expected = sorted(scores, key=lambda path: (-scores[path], path))[:k]
    assert len(got) == len(expected)
    for row, path in zip(got, expected, strict=True):
        assert row["score"] == pytest.approx(scores[path], abs=1e-5), (row, path, scores[path])
        assert row["score"] == pytest.approx(scores[row["path"]], abs=1e-5), row
        assert row["path"] == path or abs(scores[row["path"]] - scores[path]) <= 1e-5, (row, path)


def components(paths: list[str], matrix: np.ndarray, threshold: float) -> list[dict]:
    """Brute force: connected groups of pairs with cosine >= threshold, largest first, each {"paths", "min_score"}
    with min_score the smallest cosine between two members."""
    parent = list(range(len(paths)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    scores = matrix @ matrix.T
    for i, j in np.argwhere(np.triu(scores >= threshold, 1)):
        parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(paths)):
        groups.setdefault(root(i), []).append(i)
    out = []
    for members in groups.values():
        if len(members) > 1:
            inner = scores[np.ix_(members, members)] + np.diag([np.inf] * len(members))
            out.append({"paths": [paths[i] for i in members], "min_score": float(inner.min())})
    return sorted(out, key=lambda group: (-len(group["paths"]), group["paths"][0]))


# ---------------------------------------------------------------------------------------------------------------
# search: numbers and order against the reference


def test_search_by_words_equals_the_reference(tiny_model_dir, known, reference, embeddings):
    query = "a red square"
    text = unit(reference.text_features([query]))[0]
    scores = {path: float(vector @ text) for path, vector in embeddings.items()}
    for k in (3, 10, 50):
        got = rows(run("search", query, known, "-m", tiny_model_dir, "-k", k, "-f", "jsonl"))
        assert all(set(row) == {"path", "score"} for row in got)
        assert_ranking(got, scores, k)


def test_search_by_image_ranks_the_copies_first(tiny_model_dir, known, embeddings):
    original = str(known / "orig.png")
    scores = {path: float(vector @ embeddings[original]) for path, vector in embeddings.items()}
    got = rows(run("search", "--image", original, known, "-m", tiny_model_dir, "-f", "jsonl", "-k", 20))
    assert_ranking(got, scores, 20)
    assert sorted(row["path"] for row in got[:4]) == [str(known / name) for name in COPIES]
    assert got[0]["path"] == original and got[0]["score"] == pytest.approx(1.0, abs=1e-6)
    assert got[3]["score"] > 0.99 > got[4]["score"]


def test_search_defaults_to_the_current_folder_and_ten_results(tiny_model_dir, known, monkeypatch):
    monkeypatch.chdir(known)
    got = rows(run("search", "a circle", "-m", tiny_model_dir, "-f", "jsonl"))
    assert len(got) == 10 and sorted(row["path"] for row in got) == sorted(f"./{n}" for n in COPIES + OTHERS)


def test_combined_queries_add_and_subtract_normalised_embeddings(tiny_model_dir, known, reference, embeddings):
    texts = unit(reference.text_features(["a red square", "a circle", "noise"]))
    vector = unit(texts[0] + texts[1] - texts[2])
    scores = {path: float(e @ vector) for path, e in embeddings.items()}
    got = rows(run("search", "a red square", known, "--add", "a circle", "--subtract", "noise", "-k", 10,
                   "-f", "jsonl", "-m", tiny_model_dir))
    assert_ranking(got, scores, 10)
    # Images too, with --image, --add-image and --subtract-image: the same sum of unit embeddings.
    image = lambda name: embeddings[str(known / name)]  # noqa: E731
    vector = unit(image("circle.png") + image("red.png") - image("noise.png") + texts[1])
    scores = {path: float(e @ vector) for path, e in embeddings.items()}
    got = rows(run("search", "--image", known / "circle.png", known, "--add-image", known / "red.png",
                   "--subtract-image", known / "noise.png", "--add", "a circle", "-f", "jsonl", "-m", tiny_model_dir))
    assert_ranking(got, scores, 10)


def test_terms_that_cancel_out_are_a_usage_error(tiny_model_dir, known):
    assert_usage_error(invoke("search", "a cat", known, "--subtract", "a cat", "-m", tiny_model_dir),
                       "cancel out")


def test_equal_scores_come_in_path_order(tiny_model_dir, tmp_path):
    # Byte-identical files: one index entry, so exactly equal scores, whichever batch each falls in.
    folder = tmp_path / "ties"
    (folder / "sub").mkdir(parents=True)
    photo(50, 40, seed=1).save(folder / "z.png")
    for name in ("b.png", "a.png", "sub/c.png", "m.png"):
        shutil.copy(folder / "z.png", folder / name)
    photo(50, 40, seed=2).save(folder / "other.png")
    names = ["a.png", "b.png", "m.png", "sub/c.png", "z.png"]
    for k, batch in ((10, 1), (3, 2), (5, 32)):
        got = rows(run("search", "--image", folder / "z.png", folder, "-k", k, "--batch-size", batch,
                       "-f", "jsonl", "-m", tiny_model_dir))
        assert [row["path"] for row in got] == [str(folder / n) for n in [*names, "other.png"]][:k]
        assert len({row["score"] for row in got[:5]}) == 1
    # Any query, with 512-wide embeddings: the copies' rows sit at different places in one product and must still
    # score alike (a BLAS product rounds a row by its place, which split such ties).
    wide = make_hf_checkpoint(tmp_path / "wide", projection_dim=512)
    for query in (["a photo of a beach"], ["beach", "--add-image", folder / "z.png", "--subtract-image",
                                           folder / "other.png"]):
        got = rows(run("search", *query, folder, "-f", "jsonl", "-m", wide))
        copies = [row for row in got if row["path"] != str(folder / "other.png")]
        assert [row["path"] for row in copies] == [str(folder / n) for n in names]
        assert len({row["score"] for row in copies}) == 1, copies


def test_a_query_longer_than_the_context_is_truncated_with_a_warning(tiny_model_dir, known, reference,
                                                                     embeddings):
    query = " ".join(["a very long description of a red square on a blue background"] * 12)
    result = run("search", query, known, "-m", tiny_model_dir, "-f", "jsonl")
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "77-token context" in warnings[0] and "truncated" in warnings[0], result.stderr
    ids = reference.tokenizer([query], truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = reference.model.get_text_features(**ids)
    text = unit(getattr(out, "pooler_output", out).numpy())[0]
    assert_ranking(rows(result), {p: float(e @ text) for p, e in embeddings.items()}, 10)


def test_unreadable_images_are_reported_and_the_others_ranked(tiny_model_dir, known, tmp_path, embeddings):
    folder = tmp_path / "mixed"
    shutil.copytree(known, folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (folder / "empty.png").write_bytes(b"")
    result = run("search", "--image", folder / "orig.png", folder, "-m", tiny_model_dir, "-f", "jsonl", "-k", 20,
                 expect=1)
    hits = [row for row in rows(result) if "error" not in row]
    assert sorted(row["path"] for row in hits) == sorted(str(folder / n) for n in COPIES + OTHERS)
    broken = [str(folder / "broken.jpg"), str(folder / "empty.png")]
    # The failures also as rows after the ranking (cli-contract: every input has a row), and on stderr.
    assert [(row["path"], set(row)) for row in rows(result)[len(hits):]] == [(p, {"path", "error"}) for p in broken]
    errors = [line for line in result.stderr.splitlines() if line.startswith(str(folder))]
    assert [line.split(":")[0] for line in errors] == broken
    lines = run("search", "--image", folder / "orig.png", folder, "-m", tiny_model_dir, "-f", "csv", "-k", 2,
                expect=1).stdout.splitlines()
    assert lines[0] == "path,score,error" and [line.split(",")[0] for line in lines[3:]] == broken
    assert all(line.split(",")[1] == "" and line.split(",")[2] for line in lines[3:])
    result = run("duplicates", folder, "--threshold", 0.99, "-m", tiny_model_dir, "-f", "jsonl", expect=1)
    assert [group["paths"] for group in rows(result)] == [[str(folder / n) for n in COPIES]]


def test_an_empty_folder_gives_empty_results(tiny_model_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    for command in (["search", "a cat"], ["duplicates"]):
        expected = {"jsonl": "", "json": "[]\n", "csv": "path,score,error\n" if command[0] == "search" else
                    "group,size,min_score,path\n"}
        for fmt, text in expected.items():
            result = run(*command, tmp_path / "empty", "-f", fmt, "-m", tiny_model_dir)
            assert result.stdout == text
            assert "warning: no images found" in result.stderr


def test_search_formats_and_output_file(tiny_model_dir, known, tmp_path):
    base = ["search", "a circle", known, "-m", tiny_model_dir, "-k", 4]
    jsonl = rows(run(*base, "-f", "jsonl"))
    assert json.loads(run(*base, "-f", "json").stdout) == jsonl
    lines = run(*base, "-f", "csv").stdout.splitlines()
    assert lines[0] == "path,score,error" and [line.split(",")[0] for line in lines[1:]] == [r["path"] for r in jsonl]
    assert [float(line.split(",")[1]) for line in lines[1:]] == pytest.approx([r["score"] for r in jsonl], abs=1e-5)
    table = run(*base).stdout.splitlines()
    assert table[0].split() == ["rank", "score", "path"] and len(table) == 5
    for rank, (line, row) in enumerate(zip(table[1:], jsonl, strict=True), 1):
        assert line.split() == [str(rank), f"{row['score']:.4f}", row["path"]]
    result = run(*base, "-f", "json", "-o", tmp_path / "hits.json")
    assert result.stdout == "" and json.loads((tmp_path / "hits.json").read_text()) == jsonl
    run(*base, "-o", tmp_path / "hits.jsonl")  # the extension picks the format
    assert [json.loads(line) for line in (tmp_path / "hits.jsonl").read_text().splitlines()] == jsonl
    run("duplicates", known, "-m", tiny_model_dir, "-o", tmp_path / "groups.csv")
    assert (tmp_path / "groups.csv").read_text().startswith("group,size,min_score,path\n1,")


def test_search_usage_errors(tiny_model_dir, known):
    assert_usage_error(invoke("search", "-m", tiny_model_dir), "nothing to search for")
    assert_usage_error(invoke("search", "  ", known, "-m", tiny_model_dir), "empty")
    assert_usage_error(invoke("search", "--image", known / "missing.png", known, "-m", tiny_model_dir),
                       "query image", "missing.png")
    (known.parent / "not-an-image.png").write_bytes(b"text")
    assert_usage_error(invoke("search", "--image", known.parent / "not-an-image.png", known, "-m", tiny_model_dir),
                       "query image", "not-an-image.png")
    assert_usage_error(invoke("search", "cat", known / "nowhere", "-m", tiny_model_dir), "does not exist")
    assert_usage_error(invoke("search", "sunset", "--image", known / "orig.png", known, "-m", tiny_model_dir),
                       "with --image every argument is a PATH", "--add 'sunset'")
    assert_usage_error(invoke("search", "cat", known, "-k", 0, "-m", tiny_model_dir), "top-k")


def test_search_by_an_indexed_image_imports_no_torch(tiny_model_dir, known, tmp_path):
    index = tmp_path / "index.db"
    run("search", "anything", known, "-m", tiny_model_dir, "--index", index)  # embeds and stores every image
    code = ("import sys, json; from typer.testing import CliRunner; from clipcli.cli import app; "
            "r = CliRunner().invoke(app, sys.argv[1:]); "
            "print(json.dumps([r.exit_code, 'torch' in sys.modules, r.stdout.count(chr(10))]))")
    for command in (["search", "--image", str(known / "orig.png"), str(known)],
                    ["duplicates", str(known), "--threshold", "0.99"]):
        args = [*command, "-f", "jsonl", "-m", str(tiny_model_dir), "--index", str(index)]
        done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=clip_env())
        assert json.loads(done.stdout.splitlines()[-1]) == [0, False, 10 if command[0] == "search" else 1], (
            done.stderr)


# ---------------------------------------------------------------------------------------------------------------
# duplicates


def test_duplicates_group_the_copies_as_the_reference_does(tiny_model_dir, known, embeddings):
    paths = list(embeddings)
    matrix = np.stack([embeddings[p] for p in paths])
    for threshold in (0.99, 0.95, 0.9):
        got = rows(run("duplicates", known, "--threshold", threshold, "-m", tiny_model_dir, "-f", "jsonl"))
        expected = components(paths, matrix, threshold)
        assert [group["paths"] for group in got] == [group["paths"] for group in expected], threshold
        assert [group["min_score"] for group in got] == pytest.approx([g["min_score"] for g in expected], abs=1e-5)
        assert all(set(group) == {"paths", "min_score"} for group in got)
    assert [group["paths"] for group in rows(run("duplicates", known, "--threshold", 0.99, "-m", tiny_model_dir,
                                                 "-f", "jsonl"))] == [[str(known / name) for name in COPIES]]


def test_min_score_is_the_smallest_cosine_in_the_group(tiny_model_dir, known, embeddings):
    """At the default 0.95 the copies and the ramp are one group in which every pair is >= 0.95; at 0.92 the
    group grows through a chain of close pairs (circle, stripes, noise), and its min_score falls below 0.92."""
    matrix = np.stack(list(embeddings.values()))
    got = json.loads(run("duplicates", known, "-m", tiny_model_dir, "-f", "json").stdout)
    assert got[0]["paths"] == sorted(str(known / name) for name in [*COPIES, "ramp.png"])
    assert got[0]["min_score"] >= 0.95
    chained = rows(run("duplicates", known, "--threshold", 0.92, "-m", tiny_model_dir, "-f", "jsonl"))
    expected = components(list(embeddings), matrix, 0.92)
    assert [g["paths"] for g in chained] == [g["paths"] for g in expected]
    assert chained[0]["min_score"] == pytest.approx(expected[0]["min_score"], abs=1e-5)
    assert chained[0]["min_score"] < 0.92 and len(chained[0]["paths"]) > len(got[0]["paths"])


def test_exact_copies_are_one_group_at_any_threshold(tiny_model_dir, tmp_path):
    folder = tmp_path / "exact"
    folder.mkdir()
    photo(40, 30, seed=5).save(folder / "a.png")
    shutil.copy(folder / "a.png", folder / "b.png")
    photo(40, 30, seed=6).save(folder / "c.png")
    got = rows(run("duplicates", folder, "--threshold", 1.0, "-m", tiny_model_dir, "-f", "jsonl"))
    assert got == [{"paths": [str(folder / "a.png"), str(folder / "b.png")], "min_score": 1.0}]


def test_duplicates_csv_and_table_have_one_line_per_image(tiny_model_dir, known):
    base = ["duplicates", known, "-m", tiny_model_dir]
    groups = rows(run(*base, "-f", "jsonl"))
    lines = run(*base, "-f", "csv").stdout.splitlines()
    assert lines[0] == "group,size,min_score,path"
    expected = [[str(number), str(len(g["paths"])), path] for number, g in enumerate(groups, 1) for path in g["paths"]]
    cells = [line.split(",") for line in lines[1:]]
    assert [[c[0], c[1], c[3]] for c in cells] == expected
    assert [float(c[2]) for c in cells] == pytest.approx(
        [g["min_score"] for g in groups for _ in g["paths"]], abs=1e-5)
    result = run(*base)
    table = result.stdout.splitlines()
    assert table[0].split() == ["group", "size", "min", "score", "path"]
    assert [line.split()[-1] for line in table[1:]] == [path for g in groups for path in g["paths"]]
    assert table[1].split()[:3] == ["1", str(len(groups[0]["paths"])), f"{groups[0]['min_score']:.4f}"]
    assert f"{len(groups)} group(s) of near-duplicates" in result.stderr


@pytest.mark.parametrize("command", ["search", "duplicates"])
def test_help_names_values_not_python_types(command):
    text = run(command, "--help").stdout
    for python_type in ("<list[", "<str>", "<int", "<path>", "<float", "<bool"):
        assert python_type not in text, (python_type, text)
    for shown in ("[auto|fp32|fp16|bf16]", "[table|csv|json|jsonl]", "--files-from FILE", "--exclude GLOB", "PATH"):
        assert shown in text, shown


def test_duplicates_usage_errors(tiny_model_dir, known):
    for value in ("1.5", "-2", "high"):
        assert_usage_error(invoke("duplicates", known, "--threshold", value, "-m", tiny_model_dir), "--threshold")
    assert_usage_error(invoke("duplicates", "-m", tiny_model_dir), "no images given")
    assert_usage_error(invoke("duplicates", known, "-o", "groups.html", "-m", tiny_model_dir), "no HTML report")


# ---------------------------------------------------------------------------------------------------------------
# the numpy core against plain brute force


def test_top_k_is_exact_with_ties_in_input_order():
    rng = np.random.default_rng(0)
    for _ in range(50):
        count, k = int(rng.integers(1, 400)), int(rng.integers(1, 40))
        scores = rng.integers(0, 6, count).astype(np.float32) / 5  # many equal scores
        best = search.TopK(k)
        step = int(rng.integers(1, 50))
        for start in range(0, count, step):
            best.add(scores[start:start + step])
        positions, values = best.result()
        expected = sorted(range(count), key=lambda i: (-scores[i], i))[:k]
        assert positions.tolist() == expected
        np.testing.assert_array_equal(values, scores[expected])


def clustered(rng: np.random.Generator, count: int, width: int, spread: float) -> np.ndarray:
    centres = rng.standard_normal((max(count // 6, 1), width))
    rows = centres[rng.integers(0, len(centres), count)] + rng.standard_normal((count, width)) * spread
    return unit(rows).astype(np.float32)


@pytest.mark.parametrize("dense", [False, True])
def test_duplicate_groups_equal_brute_force(dense, monkeypatch):
    """Many blocks, the energy bound on and off its dense path, chains, identical rows: the same groups and
    min scores as comparing every pair."""
    monkeypatch.setattr(search, "DENSE_FRACTION", 0.0 if dense else 1.0)
    rng = np.random.default_rng(1)
    for trial in range(25):
        count, width = int(rng.integers(2, 300)), int(rng.integers(2, 200))
        matrix = clustered(rng, count, width, float(rng.uniform(0.01, 0.6)))
        matrix[rng.integers(0, count, count // 10)] = matrix[0]  # exact copies
        threshold = float(rng.uniform(0.3, 1.0))
        got = search.duplicate_groups(matrix, threshold, block=int(rng.integers(5, 80)))
        names = [f"{i:04d}" for i in range(count)]
        expected = components(names, matrix.astype(np.float64), threshold)
        exact = {frozenset(np.flatnonzero((matrix == matrix[0]).all(axis=1)))}
        for group, want in zip(got, expected, strict=True):
            assert [names[i] for i in group.members] == want["paths"], trial
            members = frozenset(group.members)
            floor = 1.0 if members in exact else want["min_score"]
            assert group.min_score == pytest.approx(min(floor, 1.0), abs=1e-5), trial
        assert len(got) == len(expected), trial


def test_duplicate_groups_find_pairs_near_the_threshold_on_random_vectors():
    """Random 512-d vectors (the energy bound's worst case) with planted near-copies just above and just below the
    threshold: exactly the planted pairs above it group."""
    rng = np.random.default_rng(2)
    matrix = unit(rng.standard_normal((3000, 512))).astype(np.float32)
    planted = []
    for i in range(0, 40, 2):
        direction = rng.standard_normal(512)
        noise = unit(direction - (direction @ matrix[i]) * matrix[i])  # orthogonal to row i
        target = 0.95 + (0.002 if i % 4 == 0 else -0.002)
        matrix[i + 1000] = (target * matrix[i] + np.sqrt(1 - target**2) * noise).astype(np.float32)
        planted.append((i, i + 1000, target > 0.95))
    groups = search.duplicate_groups(matrix, 0.95, block=700)
    assert sorted(tuple(g.members) for g in groups) == sorted((a, b) for a, b, above in planted if above)
    for group in groups:
        assert group.min_score == pytest.approx(0.952, abs=1e-5)


def test_threshold_outside_cosines_is_refused():
    with pytest.raises(OptionError, match="threshold"):
        search.duplicate_groups(np.eye(3, dtype=np.float32), 1.5)
