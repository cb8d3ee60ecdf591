"""`--engine ray` (clipcli/engines/ray.py): the same rows as the local engine for embed (.npy, .parquet) and classify
(jsonl, failures as rows and on stderr), the embedding index left alone, a model that fails on the workers reported
like a local one, a killed model worker retried without losing rows, Ctrl-C with a local Ray (exit 130, nothing
written, Ray gone), the missing extra, and no ray import on a normal run.

Ray's start-up costs seconds, so the module starts one Ray for most tests (`cluster`, joined with --address) and only
the tests about the local Ray start their own. Skipped, saying why, when ray is not installed."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import photo
from tests.test_cli import clip_command, clip_env, invoke, run_clip

needs_ray = pytest.mark.skipif(find_spec("ray") is None or find_spec("pyarrow") is None,
                               reason="ray[data] is not installed: pip install -e '.[ray]' to run the Ray tests")
LABELS = "cat,dog,red car"

# A Ray for the module: started by a child process that keeps it until its stdin closes; prints the address.
_CLUSTER = (
    "import os, sys, ray\n"
    "os.environ['RAY_USAGE_STATS_ENABLED'] = '0'\n"
    "ray.init(num_cpus=2, include_dashboard=False, _temp_dir=sys.argv[1], logging_level='ERROR',\n"
    "         _system_config={'worker_niceness': 0})\n"
    "print(ray.get_runtime_context().gcs_address, flush=True)\n"
    "sys.stdin.read()\n"
    "ray.shutdown()\n"
)


@pytest.fixture(scope="module", autouse=True)
def ray_token() -> Iterator[None]:
    """Token authentication (Ray's default for a local Ray) with a token in the environment: every Ray of this module
    and every driver joining one use it, and Ray writes none to ~/.ray/auth_token."""
    saved = {name: os.environ.get(name) for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """The address of a 2-CPU Ray started once for this module."""
    if find_spec("ray") is None:
        pytest.skip("ray[data] is not installed: pip install -e '.[ray]' to run the Ray tests")
    temp = tempfile.mkdtemp(prefix="clipcli-ray-tests-", dir="/tmp" if os.path.isdir("/tmp") else None)
    proc = subprocess.Popen([sys.executable, "-c", _CLUSTER, temp], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()
        assert address, "the test Ray did not start"
        yield address
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def inputs(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The shared image folder and a folder of inputs that fail (truncated, empty, not an image): PATH arguments."""
    bad = tmp_path_factory.mktemp("bad")
    data = (image_folder / "a.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (bad / "empty.png").write_bytes(b"")
    (bad / "notes.gif").write_bytes(b"not an image at all")
    return [str(image_folder), str(bad)]


def ok(result, code: int = 0) -> str:
    assert result.exit_code == code, (result.exit_code, result.stderr, result.exception)
    return result.stdout


def failure_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not line.startswith(("wrote ", "warning: "))]


def jsonl(text: str | bytes) -> list[dict]:
    return [json.loads(line) for line in (text.decode() if isinstance(text, bytes) else text).splitlines()]


def assert_same_rows(ray_rows: list[dict], local_rows: list[dict]) -> None:
    """classify rows: the same paths, labels and failures in the same order; scores to 1e-6."""
    assert [r["path"] for r in ray_rows] == [r["path"] for r in local_rows]
    for ours, theirs in zip(ray_rows, local_rows, strict=True):
        assert ours.keys() == theirs.keys()
        if "error" in theirs:
            assert ours == theirs
            continue
        assert ours["label"] == theirs["label"] and [t["label"] for t in ours["top"]] == [
            t["label"] for t in theirs["top"]]
        assert ours["scores"].keys() == theirs["scores"].keys()
        np.testing.assert_allclose(list(ours["scores"].values()), list(theirs["scores"].values()), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# rows identical to the local engine


@needs_ray
def test_embed_npy_matches_the_local_engine_and_leaves_the_index_alone(tiny_model_dir, inputs, cluster, tmp_path):
    index = tmp_path / "index.db"
    local, ray = tmp_path / "local.npy", tmp_path / "ray.npy"
    common = [*inputs, "-m", tiny_model_dir, "--batch-size", "2"]
    local_run = invoke("embed", *common, "-o", local, "--no-index")
    ray_run = invoke("embed", *common, "-o", ray, "--engine", "ray", "--address", cluster,
                     env={"CLIP_INDEX": str(index)})
    ok(local_run, 1)
    assert ok(ray_run, 1) == ""
    assert failure_lines(ray_run.stderr) == failure_lines(local_run.stderr)
    assert len(failure_lines(ray_run.stderr)) == 4  # three inputs and the count line
    assert ray_run.stderr.splitlines()[0] == f"wrote 4 x 16 embeddings to {ray} (names in {tmp_path}/ray.paths.txt, " \
        f"model details in {tmp_path}/ray.meta.json)"
    np.testing.assert_allclose(np.load(ray), np.load(local), atol=1e-6, rtol=0)
    assert (tmp_path / "ray.paths.txt").read_text() == (tmp_path / "local.paths.txt").read_text()
    meta = json.loads((tmp_path / "ray.meta.json").read_text())
    assert meta == json.loads((tmp_path / "local.meta.json").read_text())
    assert meta["precision"] == "fp32" and meta["rows"] == 4
    assert not index.exists()  # --engine ray neither reads nor writes the index
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "local.meta.json", "local.npy", "local.paths.txt", "ray.meta.json", "ray.npy", "ray.paths.txt"]


@needs_ray
def test_embed_parquet_matches_the_local_engine(tiny_model_dir, inputs, cluster, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    local, ray = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    common = [*inputs, "-m", tiny_model_dir, "--no-normalize", "--fast-decode"]
    ok(invoke("embed", *common, "-o", local, "--no-index"), 1)
    ok(invoke("embed", *common, "-o", ray, "--engine", "ray", "--address", cluster), 1)
    ours, theirs = pq.read_table(ray), pq.read_table(local)  # one table, as pandas and Spark read it
    assert ours.schema == theirs.schema  # path string, embedding fixed-size list of float32, the model metadata
    assert ours.schema.field("embedding").type == pa.list_(pa.float32(), 16)
    meta = json.loads(ours.schema.metadata[b"clipcli"])
    assert meta["normalized"] is False and meta["precision"] == "fp32"
    assert ours.column("path").to_pylist() == theirs.column("path").to_pylist()
    assert len(ours) == 4
    np.testing.assert_allclose(np.array(ours.column("embedding").to_pylist()),
                               np.array(theirs.column("embedding").to_pylist()), atol=1e-6, rtol=0)


@needs_ray
def test_classify_with_a_local_ray_matches_the_local_engine(tiny_model_dir, inputs, tmp_path):
    """The default: no --address, so a local Ray is started for the run and shut down after it."""
    args = ["classify", *inputs, "-l", LABELS, "-t", "a photo of a {}.", "-t", "a drawing of a {}.",
            "--score", "cosine", "--min-score", "0.1", "-k", "2", "-f", "jsonl", "-m", tiny_model_dir]
    before = set(os.listdir(tempfile.gettempdir()))
    ray_run = run_clip(*args, "--engine", "ray", "--batch-size", "3", timeout=240)
    local_run = run_clip(*args, "--no-index")
    assert ray_run.returncode == local_run.returncode == 1, ray_run.stderr.decode()
    assert ray_run.stderr == local_run.stderr  # the same failures, and nothing from Ray
    rows = jsonl(ray_run.stdout)
    assert_same_rows(rows, jsonl(local_run.stdout))
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows) and len(rows) == 7
    assert {r["error"] for r in rows if "error" in r} == {"truncated image data", "empty file", "not an image file"}
    left = {name for name in set(os.listdir(tempfile.gettempdir())) - before if name.startswith("clipcli-ray-")}
    assert not left  # the local Ray's session files are removed


@needs_ray
def test_classify_to_a_file_through_the_cluster(tiny_model_dir, inputs, cluster, tmp_path):
    out = tmp_path / "rows.jsonl"
    result = invoke("classify", *inputs, "-l", LABELS, "-o", out, "-m", tiny_model_dir, "--engine", "ray",
                    "--address", cluster, "--dtype", "fp32")
    assert ok(result, 1) == ""
    local = invoke("classify", *inputs, "-l", LABELS, "-f", "jsonl", "-m", tiny_model_dir, "--no-index")
    assert_same_rows(jsonl(out.read_text()), jsonl(ok(local, 1)))
    assert result.stderr == local.stderr


# ---------------------------------------------------------------------------------------------------------------
# failures of the run itself


@needs_ray
def test_a_model_that_does_not_load_is_the_local_engines_usage_error(tiny_model_dir, image_folder, cluster,
                                                                     tmp_path):
    """The driver loads the model as the local engine does (and sends its weights to the workers): a damaged one is
    reported in the same words."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    state = load_file(broken / "model.safetensors")
    del state["vision_model.post_layernorm.bias"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "e.npy"
    local = invoke("embed", image_folder, "-o", out, "-m", broken, "--no-index")
    result = invoke("embed", image_folder, "-o", out, "-m", broken, "--engine", "ray", "--address", cluster)
    assert result.exit_code == local.exit_code == 2
    assert result.stderr == local.stderr and result.stderr.count("\n") == 1
    assert "missing 'vision_model.post_layernorm.bias'" in result.stderr and str(broken) in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


@needs_ray
def test_the_model_actor_computes_the_local_features_or_says_why_it_cannot(tiny_model_dir, image_folder):
    """ImageTower on the payload the driver sends: the features Clip.image_features gives, zero rows for inputs
    that failed to decode; a model that cannot be built there comes back as a `fatal` column, not an exception."""
    from clipcli.engines.ray import ImageTower, ModelPayload, decode_batch
    from clipcli.loader import load

    clip = load(str(tiny_model_dir), device="cpu")
    state = {name: tensor.numpy() for name, tensor in clip.model.state_dict().items()}
    payload = ModelPayload(clip.config, state, clip.tokenizer, clip.preprocess, clip.source, clip.weights_dtype)
    paths = [str(image_folder / "a.jpg"), str(image_folder / "missing.png"), str(image_folder / "b.png")]
    batch = decode_batch({"index": np.arange(3), "path": np.array([os.fsencode(p) for p in paths], dtype=object)},
                         clip.preprocess, None, None)
    out = ImageTower(payload, "cpu", "fp32", threads=1)(batch)
    assert list(out["fatal"]) == [b"", b"", b""] and list(out["error"]) == [b"", b"file not found", b""]
    expected = clip.image_features([batch["pixels"][0], batch["pixels"][2]])
    np.testing.assert_allclose(out["features"][[0, 2]], expected, atol=1e-6, rtol=0)
    assert not out["features"][1].any()
    del state["visual_projection.weight"]
    broken = ImageTower(payload, "cpu", "fp32", threads=1)(batch)
    assert set(broken["fatal"]) == {b"checkpoint keys do not match the CLIP model: missing 'visual_projection.weight'"
                                    b"; the checkpoint is incomplete, damaged, or for another architecture"}


@needs_ray
def test_an_address_nothing_listens_at_is_a_usage_error(tiny_model_dir, image_folder, tmp_path):
    result = invoke("embed", image_folder, "-o", tmp_path / "e.npy", "-m", tiny_model_dir, "--engine", "ray",
                    env={"RAY_ADDRESS": "127.0.0.1:9"})
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == ("error: cannot join the Ray cluster at '127.0.0.1:9' (connection refused); check "
                             "--address (or RAY_ADDRESS), or omit it to start a local Ray\n")
    assert list(tmp_path.iterdir()) == []


def _model_workers() -> list[int]:
    """Pids of Ray's model actor processes (their title names the fused map operator)."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if title.startswith(b"ray::MapWorker") and b"ImageTower" in title:
                found.append(int(pid))
    return found


@needs_ray
@pytest.mark.skipif(not Path("/proc/self/cmdline").is_file(), reason="finding Ray's workers needs Linux /proc")
def test_a_killed_model_worker_is_restarted_and_no_row_is_lost(tiny_model_dir, many_images, cluster):
    """SIGKILL the model actor once rows have started to arrive: Ray restarts it and retries its batch; every row
    comes out once, in order, as the local engine's, and Ray's message about the death stays off stdout."""
    args = ["classify", many_images, "-l", LABELS, "-f", "jsonl", "-m", tiny_model_dir, "--batch-size", "1"]
    # Unbuffered, so that reading the first line takes nothing more from the pipe than that line.
    proc = subprocess.Popen([*clip_command(), *map(str, args), "--engine", "ray", "--address", cluster],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clip_env(), bufsize=0)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        victims = _model_workers()
        assert first and len(victims) == 1 and proc.poll() is None, (first, victims)
        os.kill(victims[0], signal.SIGKILL)
        rest, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and stderr == b"", stderr.decode()[-2000:]
    rows = jsonl(first + rest)
    local = run_clip(*args, "--no-index")
    assert len(rows) == 400
    assert_same_rows(rows, jsonl(local.stdout))


@needs_ray
@pytest.mark.skipif(not Path("/proc/self/cmdline").is_file(), reason="finding Ray's workers needs Linux /proc")
def test_ctrl_c_with_a_local_ray_writes_nothing_and_stops_ray(tiny_model_dir, many_images, tmp_path):
    out = tmp_path / "e.npy"
    temp = Path(tempfile.gettempdir())
    before = {p.name for p in temp.iterdir() if p.name.startswith("clipcli-ray-")}
    proc = subprocess.Popen([*clip_command(), "embed", str(many_images), "-o", str(out), "-m", str(tiny_model_dir),
                             "--engine", "ray", "--batch-size", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=clip_env())
    try:
        deadline = time.monotonic() + 180
        while not _model_workers() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        session = {p.name for p in temp.iterdir() if p.name.startswith("clipcli-ray-")} - before
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130 and stdout == b""
    assert stderr == b"interrupted; no output was written\n"
    assert list(tmp_path.iterdir()) == []  # no .npy, no sidecars, no temp files
    assert len(session) == 1 and not (temp / session.pop()).exists()  # Ray's session files are gone
    time.sleep(1)
    assert _model_workers() == []  # and so is Ray


# ---------------------------------------------------------------------------------------------------------------
# without the extra, and without ray in a normal run


def _clip_without_ray(*args: object) -> subprocess.CompletedProcess:
    """`clip args` in a process where `import ray` fails, as without the extra."""
    code = ("import sys; sys.modules['ray'] = None; sys.argv = ['clip', *sys.argv[1:]]\n"
            "from clipcli.cli import main; main()")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, env=clip_env(),
                          timeout=120)


@pytest.mark.parametrize("command", ["embed", "classify"])
def test_without_the_extra_engine_ray_names_it(tiny_model_dir, image_folder, tmp_path, command):
    args = ["-o", tmp_path / "e.npy"] if command == "embed" else ["-l", LABELS]
    done = _clip_without_ray(command, image_folder, *args, "-m", tiny_model_dir, "--engine", "ray")
    assert done.returncode == 2 and done.stdout == b""
    assert done.stderr.decode() == ("error: --engine ray needs Ray Data, which is not installed (ray is missing); "
                                    "pip install 'clipcli[ray]', or use --engine local\n")
    assert list(tmp_path.iterdir()) == []
    local = _clip_without_ray(command, image_folder, *args, "-m", tiny_model_dir, "--no-index")
    assert local.returncode == 0, local.stderr  # the local engine needs no ray


def test_a_normal_run_never_imports_ray(tiny_model_dir, image_folder, tmp_path):
    code = ("import atexit, sys\n"
            "atexit.register(lambda: sys.stderr.write('ray imported: %s\\n' % any(\n"
            "    name == 'ray' or name.startswith('ray.') for name in sys.modules)))\n"
            "sys.argv = ['clip', *sys.argv[1:]]\n"
            "from clipcli.cli import main; main()")
    for args in (["classify", image_folder, "-l", LABELS, "-m", tiny_model_dir, "--no-index"],
                 ["embed", image_folder, "-o", tmp_path / "e.parquet", "-m", tiny_model_dir]):
        done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, env=clip_env(),
                              timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stderr.decode().splitlines()[-1] == "ray imported: False", args


def test_help_says_what_the_ray_engine_does_with_the_index():
    for command in ("classify", "embed"):
        text = " ".join(ok(invoke(command, "--help")).split())
        assert "--engine [local|ray]" in text and "--address ADDR" in text
        assert "the embedding index is neither read nor written" in text and "RAY_ADDRESS" in text


# ---------------------------------------------------------------------------------------------------------------
# the plan: how a run uses a cluster


@needs_ray
@pytest.mark.parametrize("cpus, gpus, nodes, device, dtype, expected", [
    # CPU only: actors the size of the smallest node, as many as fit; decoding fused into them, on all their cores.
    (2, 0, (2,), "auto", "auto", ("cpu", "fp32", 1, 2, 0, 2, 2)),
    (34, 0, (2, 16, 16), "auto", "auto", ("cpu", "fp32", 17, 2, 0, 2, 2)),
    (16, 2, (8, 8), "cpu", "bf16", ("cpu", "bf16", 2, 8, 0, 8, 8)),
    # GPUs: one actor per GPU, one CPU each to feed it; decode tasks of one CPU on the others.
    (16, 2, (8, 8), "auto", "auto", ("cuda", "fp16", 2, 1, 1, None, 1)),
    (16, 4, (8, 8), "cuda:1", "fp32", ("cuda", "fp32", 4, 1, 1, None, 1)),
])
def test_plan_follows_the_cluster(cpus, gpus, nodes, device, dtype, expected):
    from clipcli.engines.ray import Cluster, plan_for

    plan = plan_for(Cluster(cpus, gpus, nodes), device, dtype)
    assert (plan.device, plan.precision, plan.actors, plan.actor_cpus, plan.actor_gpus, plan.threads,
            plan.decode_threads) == expected
    assert plan.decode_cpus == (plan.actor_cpus if plan.device == "cpu" else 1)


@needs_ray
@pytest.mark.parametrize("device, problem", [("cuda", "the Ray cluster has no GPU"),
                                             ("mps", "is not available on a Ray cluster")])
def test_plan_refuses_a_device_the_cluster_lacks(device, problem):
    from clipcli.engines.ray import Cluster, plan_for
    from clipcli.errors import OptionError

    with pytest.raises(OptionError, match=problem):
        plan_for(Cluster(4, 0, (4,)), device, "auto")


@needs_ray
def test_block_rows():
    from clipcli.engines.ray import MAX_BLOCK_ROWS, block_rows

    assert block_rows(200, 2, 32) == 32  # 25 a CPU-quarter, rounded up to a batch
    assert block_rows(5, 2, 32) == 32
    assert block_rows(5000, 2, 32) == 640
    assert block_rows(50_000_000, 1000, 32) == MAX_BLOCK_ROWS
    assert block_rows(10_000, 4, 2048) == 2048  # never less than one batch


@needs_ray
def test_decode_batch_reports_failures_in_the_local_engines_words(image_folder, tmp_path):
    from clipcli.engines.ray import decode_batch
    from clipcli.preprocess import PreprocessConfig, decode_image, preprocess, read_image_file

    (tmp_path / "empty.png").write_bytes(b"")
    photo(8, 8).save(tmp_path / "tiny.png")
    paths = [str(image_folder / "a.jpg"), str(tmp_path / "empty.png"), str(tmp_path / "gone.jpg"),
             str(tmp_path / "tiny.png")]
    config = PreprocessConfig.for_image_size(32)
    batch = {"index": np.arange(4), "path": np.array([os.fsencode(p) for p in paths], dtype=object)}
    for threads in (1, 3):
        out = decode_batch(batch, config, None, None, threads=threads)
        assert list(out["error"]) == [b"", b"empty file", b"file not found", b""]
        assert out["pixels"].shape == (4, 3, 32, 32) and out["pixels"].dtype == np.float32
        for row in (0, 3):
            np.testing.assert_array_equal(out["pixels"][row], preprocess(decode_image(read_image_file(paths[row])),
                                                                         config))
