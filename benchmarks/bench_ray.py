"""`clip embed --engine ray` (a local Ray started for the run) beside the local engine (`--no-index`), side by side in
one run, against issue 15's targets:

- rows identical: the same paths in the same order, embeddings max |diff| <= 1e-6, the same failures;
- throughput of the whole command with a local Ray >= 0.7x the local engine's on the 200-photo folder
  (random-weight ViT-B/32, fp32, exact decoding, batch size 32);
- the driver's peak memory flat in the number of images (500 vs 5,000 small images, tiny model, .parquet).

Also prints the rates that size a cluster (images/s per CPU for decoding, per CPU for the model) and the fixed cost
of each engine (one photo). Builds its inputs once under .bench/ (git-ignored). Each timed command waits (up to 2
minutes) for the machine to be quiet and reports the CPU other processes used meanwhile: on a shared machine compare
the ratios of one run, not numbers across runs.

    .venv/bin/python benchmarks/bench_ray.py [--rounds 3] [--memory-images 500 5000]
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BENCH_DIR,
    REPO,
    OtherLoad,
    checkpoint,
    first_photos,
    image_paths,
    photo_folder,
    wait_until_quiet,
)

# Runs clip in this interpreter and prints the process's own peak RSS (VmHWM, KiB) on stderr at exit: the driver's
# memory alone, whatever Ray's worker processes use.
_DRIVER = (
    "import atexit, sys\n"
    "def peak():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM'):\n"
    "            sys.stderr.write('driver-peak-kib ' + line.split()[1] + '\\n')\n"
    "atexit.register(peak)\n"
    "sys.argv = ['clip', *sys.argv[1:]]\n"
    "from clipcli.cli import main\n"
    "main()\n"
)


# A local Ray uses token authentication; a token in the environment keeps Ray from writing one to ~/.ray.
_TOKEN = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


# Runs the driver above as its child while being the "subreaper" of everything it starts (prctl
# PR_SET_CHILD_SUBREAPER): Ray's processes, orphaned when the local Ray shuts down, are reaped here, so that their CPU
# time counts as the run's (RUSAGE_CHILDREN), not as other processes'. Prints that CPU time on stderr.
_LAUNCHER = (
    "import ctypes, os, resource, subprocess, sys, time\n"
    "ctypes.CDLL('libc.so.6').prctl(36, 1, 0, 0, 0)\n"
    "code = subprocess.run([sys.executable, '-c', sys.argv[1], *sys.argv[2:]]).returncode\n"
    "deadline = time.monotonic() + 60\n"
    "while time.monotonic() < deadline:\n"
    "    try:\n"
    "        if os.waitpid(-1, os.WNOHANG) == (0, 0):\n"
    "            time.sleep(0.05)\n"
    "    except ChildProcessError:\n"
    "        break\n"
    "use = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "sys.stderr.write('run-cpu-seconds %.2f\\n' % (use.ru_utime + use.ru_stime))\n"
    "sys.exit(code)\n"
)


@dataclass(frozen=True)
class Run:
    """One command: wall seconds, the driver's peak RSS (MiB), the CPU seconds of all its processes, stderr."""

    seconds: float
    peak: float
    cpu: float
    stderr: str


def run_clip(args: list[str], meter: OtherLoad) -> Run:
    """Run `clip args` (stdout discarded) and measure it; see Run."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **_TOKEN}
    env.pop("RAY_ADDRESS", None)
    with meter:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", _LAUNCHER, _DRIVER, *args], capture_output=True, text=True,
                              cwd=REPO, env=env, stdin=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
    if done.returncode not in (0, 1):
        raise SystemExit(f"clip {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    peak = re.search(r"driver-peak-kib (\d+)", done.stderr)
    cpu = re.search(r"run-cpu-seconds ([\d.]+)", done.stderr)
    return Run(seconds, int(peak.group(1)) / 1024 if peak else float("nan"), float(cpu.group(1)) if cpu else
               float("nan"), done.stderr)


def failures(stderr: str) -> list[str]:
    """The `path: reason` lines of a run's stderr."""
    return sorted(line for line in stderr.splitlines()
                  if ": " in line and not line.startswith(("wrote ", "warning: ", "driver-peak-kib")))


def broken_inputs(folder: Path) -> Path:
    """Two inputs that fail: a truncated JPEG and an empty file."""
    folder.mkdir(parents=True, exist_ok=True)
    photo = Path(image_paths(BENCH_DIR / "photos", 1)[0]).read_bytes()
    (folder / "truncated.jpg").write_bytes(photo[: len(photo) // 3])
    (folder / "empty.png").write_bytes(b"")
    return folder


def cluster_sizing(model_dir: Path, photos: list[str]) -> None:
    """Images/s per CPU: decoding (one thread, exact and fast) and the model (one torch thread, fp32)."""
    import torch

    from clipcli.engines.ray import decode_batch
    from clipcli.loader import load

    clip = load(str(model_dir), device="cpu", dtype="fp32")
    config = clip.preprocess
    batch = {"index": np.arange(len(photos)), "path": np.array([os.fsencode(p) for p in photos], dtype=object)}
    rates = {}
    for name, draft in (("exact", None), ("fast", config.draft_size)):
        wait_until_quiet()
        start = time.perf_counter()
        decoded = decode_batch(batch, config, draft, None, threads=1)
        rates[name] = len(photos) / (time.perf_counter() - start)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    clip.image_features(list(decoded["pixels"][:4]))  # warm-up
    wait_until_quiet()
    start = time.perf_counter()
    clip.image_features(list(decoded["pixels"]))
    model_rate = len(photos) / (time.perf_counter() - start)
    torch.set_num_threads(threads)
    print(f"sizing, per CPU (one thread), {len(photos)} photos: decoding {rates['exact']:.1f} images/s exact, "
          f"{rates['fast']:.1f} with --fast-decode; ViT-B/32 fp32 model {model_rate:.1f} images/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each engine (default 3)")
    parser.add_argument("--photos", type=int, default=200, help="photos in the timed runs (default 200, the target's)")
    parser.add_argument("--memory-images", type=int, nargs=2, default=[500, 5000], metavar=("SMALL", "LARGE"),
                        help="image counts of the driver-memory comparison (default 500 5000)")
    args = parser.parse_args()

    model_dir = checkpoint(BENCH_DIR / "vit-b-32")
    photos = first_photos(photo_folder(BENCH_DIR / "photos", args.photos), args.photos)
    inputs = args.photos + 2
    broken = broken_inputs(BENCH_DIR / "ray-broken")
    out = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    common = ["--model", str(model_dir), "--device", "cpu", "--batch-size", "32", "-q"]
    print(f"{os.cpu_count()} CPUs; {len(os.listdir(photos))} photos + 2 broken files; random ViT-B/32 fp32; "
          f"batch size 32; local Ray with {os.cpu_count()} CPUs started by each ray run")

    cluster_sizing(model_dir, image_paths(BENCH_DIR / "photos", 32))

    meter = OtherLoad()
    runs: dict[str, list[Run]] = {"local": [], "ray": []}
    for round_ in range(args.rounds):
        order = ("local", "ray") if round_ % 2 == 0 else ("ray", "local")
        for engine in order:
            wait_until_quiet()
            engine_args = ["--no-index"] if engine == "local" else ["--engine", "ray"]
            run = run_clip(["embed", str(photos), str(broken), "-o", str(out / f"{engine}.npy"), *common,
                            *engine_args], meter)
            runs[engine].append(run)
            print(f"round {round_ + 1}: {engine:5s} {run.seconds:6.1f} s ({inputs / run.seconds:5.2f} inputs/s), "
                  f"CPU {run.cpu:6.1f} core-s, driver peak {run.peak:6.0f} MiB, other processes "
                  f"{meter.samples[-1]:.2f} cores", flush=True)
    times = {engine: [run.seconds for run in done] for engine, done in runs.items()}
    cpu = {engine: [run.cpu for run in done] for engine, done in runs.items()}
    stderr = {engine: done[-1].stderr for engine, done in runs.items()}

    local, ray = np.load(out / "local.npy"), np.load(out / "ray.npy")
    same_paths = (out / "local.paths.txt").read_text() == (out / "ray.paths.txt").read_text()
    diff = float(np.abs(local - ray).max()) if local.shape == ray.shape else float("inf")
    same_failures = failures(stderr["local"]) == failures(stderr["ray"])
    ratios = [lt / rt for lt, rt in zip(times["local"], times["ray"], strict=True)]
    print()
    print(f"rows: {ray.shape[0]} x {ray.shape[1]} (local {local.shape[0]} x {local.shape[1]}); same paths in order: "
          f"{same_paths}; max |diff| {diff:.2e} [<= 1e-6]; same failures: {same_failures} "
          f"({len(failures(stderr['ray']))}: {'; '.join(failures(stderr['ray']))})")
    print(f"wall seconds, median [each round]: local {statistics.median(times['local']):.1f} "
          f"{[round(t, 1) for t in times['local']]}, ray {statistics.median(times['ray']):.1f} "
          f"{[round(t, 1) for t in times['ray']]}")
    print(f"throughput ray / local, median of per-round ratios: {statistics.median(ratios):.2f} "
          f"{[round(r, 2) for r in ratios]} [>= 0.7 with 200 photos]")
    cpu_ratios = [lc / rc for lc, rc in zip(cpu["local"], cpu["ray"], strict=True)]
    print(f"CPU core-seconds of the whole run (every process), median: local {statistics.median(cpu['local']):.1f}, "
          f"ray {statistics.median(cpu['ray']):.1f}; local / ray {statistics.median(cpu_ratios):.2f} "
          f"{[round(r, 2) for r in cpu_ratios]} (what the wall ratio would be on an otherwise idle machine whose "
          "cores both engines keep busy)")

    # Fixed costs: one photo through each engine (start, load, and for Ray start and stop a local cluster).
    one = first_photos(photos, 1)
    for engine in ("local", "ray"):
        wait_until_quiet()
        engine_args = ["--no-index"] if engine == "local" else ["--engine", "ray"]
        run = run_clip(["embed", str(one), "-o", str(out / f"one-{engine}.npy"), *common, *engine_args], meter)
        print(f"one photo: {engine:5s} {run.seconds:.1f} s, CPU {run.cpu:.1f} core-s (other processes "
              f"{meter.samples[-1]:.2f} cores)")

    # Driver memory against the number of images: small JPEGs and a tiny model, written to .parquet.
    tiny = checkpoint(BENCH_DIR / "tiny-clip", tiny=True)
    small, large = args.memory_images
    folder = photo_folder(BENCH_DIR / "small-photos", large, sizes=[(64, 64)])
    memory = {}
    for count in (small, large):
        wait_until_quiet()
        run = run_clip(["embed", str(first_photos(folder, count)), "-o", str(out / f"m{count}.parquet"),
                        "--model", str(tiny), "--device", "cpu", "-q", "--engine", "ray"], meter)
        memory[count] = run.peak
        print(f"memory: ray driver, {count} images: peak {run.peak:.0f} MiB ({run.seconds:.1f} s)")
    print(f"driver peak {large} / {small} images: {memory[large] / memory[small]:.3f} [flat: <= 1.10]")
    for path in out.iterdir():
        path.unlink()
    out.rmdir()


if __name__ == "__main__":
    main()
