"""`clip search` and `clip duplicates` targets (issue 11), side by side in one run, random ViT-B/32:

  - a second search over 100,000 indexed embeddings, start-up and the query's text embedding included: <= 2.5 s;
  - the same with --image of an already-indexed image (no torch import): <= 0.5 s;
  - beside them, the floor of both: start-up, the walk and one stat per file (which a run must make to notice a
    changed file), and that plus `import torch` (which embedding a new text query needs);
  - `clip duplicates` over 100,000 indexed embeddings: <= 60 s, peak memory < 2 GB.

Every timing is a `clip` command as a subprocess (what a user waits for), the best of --rounds, with its CPU time
(user + system, which other processes' load on a shared machine changes far less than wall time) and peak RSS, and
the cores other processes used meanwhile. Beside them, for scale: the warm path alone (a search whose query is
already in the prompt cache; a warm classify of the same files) and the numpy core in-process (ranking 100,000 and
1,000,000 rows; duplicate grouping with and without its energy bound).

The 100,000 files and their index are built once under .bench/ with benchmarks/bench_index.py's populate_synthetic:
the model's real fingerprint, each file's real digest and stat memo entry, random unit vectors as features (all a
warm run reads; computing 100,000 embeddings takes hours here). Random vectors are the energy bound's worst case.

    .venv/bin/python benchmarks/bench_search.py [--rounds 3] [--entries 100000] [--skip-core] [--quiet-wait 30]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_index import synthetic_index, tiny_files
from common import BENCH_DIR, REPO, OtherLoad, checkpoint, wait_until_quiet

# Runs argv[1:] with stdout discarded; prints the child's CPU seconds and peak RSS (KiB) on its last line.
_LAUNCHER = ("import resource, subprocess, sys; "
             "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE); "
             "sys.stderr.buffer.write(code.stderr); u = resource.getrusage(resource.RUSAGE_CHILDREN); "
             "print(u.ru_utime + u.ru_stime, u.ru_maxrss); sys.exit(code.returncode)")


def clip(*args: object) -> list[str]:
    return [sys.executable, "-m", "clipcli", *map(str, args)]


def measure(command: Sequence[str]) -> tuple[float, float, float, float]:
    """(wall s, CPU s, peak RSS MiB, other processes' cores) of one run of `command`, stdout discarded."""
    load = OtherLoad()
    with load:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", _LAUNCHER, *command], capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    cpu, rss = done.stdout.split()[-2:]
    return wall, float(cpu), int(rss) / 1024, load.samples[-1]


QUIET = {"wait": 30.0}  # seconds to wait for other processes to go quiet before each timed run (--quiet-wait)


def best(commands: Sequence[Sequence[str]]) -> tuple[float, float, float, float]:
    """The run with the least wall time among one run of each command (waiting for a quiet machine first)."""
    runs = []
    for command in commands:
        wait_until_quiet(timeout=QUIET["wait"])
        runs.append(measure(command))
    return min(runs)


def report(name: str, run: tuple[float, float, float, float], target: float | None = None, unit: str = "s") -> None:
    wall, cpu, rss, load = run
    versus = f"   [target <= {target:g} {unit}: {wall / target:.2f}x of it]" if target else ""
    print(f"{name:<58} {wall:6.2f} s wall, {cpu:6.2f} s CPU, peak {rss:5.0f} MiB, others {load:.1f} cores{versus}")


def core(entries: int) -> None:
    """The numpy work alone, in this process: ranking rows by a query, and duplicate grouping."""
    from clipcli import search

    rng = np.random.default_rng(0)
    block = rng.standard_normal((65_536, 512), dtype=np.float32)
    block /= np.linalg.norm(block, axis=1, keepdims=True)
    query = block[0]
    for rows in (100_000, 1_000_000):
        wait_until_quiet(timeout=QUIET["wait"])
        start = time.perf_counter()
        best = search.TopK(10)
        for done in range(0, rows, len(block)):  # one block reused: the cost per row, without 2 GB of rows
            best.add(np.dot(block[:min(len(block), rows - done)], query))
        print(f"  rank {rows:>9,} unit rows (512-d) by one query, top 10: {time.perf_counter() - start:6.3f} s")
    matrix = rng.standard_normal((entries, 512), dtype=np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    wait_until_quiet(timeout=QUIET["wait"])
    load = OtherLoad()
    with load:
        start, cpu = time.perf_counter(), time.process_time()
        search.duplicate_groups(matrix, 0.95)
        bounded = time.perf_counter() - start, time.process_time() - cpu
    print(f"  duplicate_groups, {entries:,} random rows, energy bound: {bounded[0]:6.1f} s wall, "
          f"{bounded[1]:6.1f} s CPU, others {load.samples[-1]:.1f} cores")
    wait_until_quiet(timeout=QUIET["wait"])
    with load:
        start, cpu = time.perf_counter(), time.process_time()
        for first in range(0, entries, search.BLOCK):  # the plain blocked product over every pair, for comparison
            for other in range(first, entries, search.BLOCK):
                scores = np.dot(matrix[first:first + search.BLOCK], matrix[other:other + search.BLOCK].T)
                np.nonzero(scores >= 0.95)
        plain = time.perf_counter() - start, time.process_time() - cpu
    print(f"  the same pairs, plain blocked products:                  {plain[0]:6.1f} s wall, {plain[1]:6.1f} s "
          f"CPU, others {load.samples[-1]:.1f} cores; bound / plain CPU {bounded[1] / plain[1]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--skip-core", action="store_true", help="skip the in-process numpy measurements")
    parser.add_argument("--quiet-wait", type=float, default=QUIET["wait"],
                        help="seconds to wait for a quiet machine before each timed run")
    args = parser.parse_args()
    QUIET["wait"] = args.quiet_wait

    model = checkpoint(BENCH_DIR / "vit-b-32")
    work = BENCH_DIR / "search"
    work.mkdir(parents=True, exist_ok=True)
    files = tiny_files(work / f"files-{args.entries}", args.entries)
    index = synthetic_index(work / f"search-{args.entries}.db", model, files, args.entries)
    example = sorted(files.iterdir())[args.entries // 2]
    common = ["-m", model, "--index", index, "-f", "jsonl", "-q"]
    print(f"random ViT-B/32 at {model}; {args.entries:,} indexed files; rounds {args.rounds}")
    subprocess.run(clip("search", "a warm-up query", files, *common), check=True, stdout=subprocess.DEVNULL)

    stamp = int(time.time())
    fresh = [clip("search", f"a photo of a beach at sunset {stamp} {r}", files, *common) for r in range(args.rounds)]
    new_query = best(fresh)
    report(f"search, a new text query, {args.entries:,} indexed", new_query, 2.5)
    cached = best([clip("search", "a warm-up query", files, *common)] * args.rounds)
    report("search, the same query again (prompt cached: no torch)", cached)
    image = best([clip("search", "--image", example, files, *common)] * args.rounds)
    report("search --image of an indexed image (no torch)", image, 0.5)
    classify = best([clip("classify", files, "-l", "a warm-up query", *common)] * args.rounds)
    report("classify, one cached label (the same warm path)", classify)
    startup = best([[sys.executable, "-c", "import clipcli.cli, clipcli.pipeline, clipcli.search"]] * args.rounds)
    report("start-up alone (python + imports)", startup)
    torch_import = best([[sys.executable, "-c", "import torch"]] * args.rounds)
    report("import torch alone", torch_import)
    # What any run that must notice a changed file pays before reading the index: start-up, the walk, a stat each.
    walk = ("import os, sys, clipcli.cli, clipcli.pipeline, clipcli.search; from clipcli.inputs import find_images; "
            "[os.stat(path) for path in find_images([sys.argv[1]])[0]]")
    floor = best([[sys.executable, "-c", walk, str(files)]] * args.rounds)
    report("floor: start-up + walk + one stat per file", floor, 0.5)
    print(f"  new query / cached query: {new_query[0] / cached[0]:.2f}x wall; the text embedding's share (torch, "
          f"model, text) {new_query[0] - cached[0]:.2f} s; warm path beyond start-up {cached[0] - startup[0]:.2f} s")
    print(f"  floor + import torch: {floor[0] + torch_import[0]:.2f} s, before the text tower is loaded   "
          f"[target <= 2.5 s: {(floor[0] + torch_import[0]) / 2.5:.2f}x of it]")

    duplicates = best([clip("duplicates", files, "-m", model, "--index", index, "-f", "jsonl", "-q")])
    report(f"duplicates, {args.entries:,} indexed", duplicates, 60)
    print(f"  duplicates peak RSS {duplicates[2]:.0f} MiB   [target < 2048 MiB: {duplicates[2] / 2048:.2f}x of it]")
    if not args.skip_core:
        core(args.entries)


if __name__ == "__main__":
    main()
