"""How to share the CPU between image decoding and the model: the measurements behind pipeline.Settings.ahead's
default (0 on CPU) and the default --workers. In alternation for several rounds, images/s of:

  - decoding alone (decode + exact or draft preprocessing): 1, cores and 2 x cores threads; cores processes;
  - the model alone on batches of the same size, torch using all cores or one;
  - decode + model together (pipeline.Session.image_features, no index): decode each batch between model calls
    (ahead=0, the CPU default) or one batch ahead during the model call (ahead=1, overlapped), with several splits
    of decode threads and torch threads; and the same between-calls scheme with worker processes, not threads.

    .venv/bin/python benchmarks/bench_decode.py --images 64 --rounds 3 [--dtype bf16] [--fast-decode]
        [--keep-freed-memory]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_DIR, OtherLoad, checkpoint, image_paths, photo_folder, wait_until_quiet


def decode_in_process(path: str, config, draft_size: int | None) -> np.ndarray:
    """Worker-process side: one path -> (3, H, W) float32 array (numpy pickles without torch's shared memory)."""
    from clipcli.preprocess import load_image, preprocess

    return preprocess(load_image(Path(path), draft_size=draft_size), config)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--fast-decode", action="store_true")
    parser.add_argument("--no-wait", action="store_true",
                        help="start each timed run at once, not after other processes go quiet (up to 2 min)")
    parser.add_argument("--keep-freed-memory", action="store_true", help="call process.keep_freed_memory() first")
    args = parser.parse_args()

    from concurrent.futures import ThreadPoolExecutor

    import torch

    from clipcli import pipeline
    from clipcli.loader import load
    from clipcli.preprocess import load_image, preprocess
    from clipcli.process import keep_freed_memory

    kept = keep_freed_memory() if args.keep_freed_memory else False

    model_dir = checkpoint(BENCH_DIR / "vit-b-32")
    clip = load(str(model_dir), device="cpu", dtype=args.dtype)
    paths = image_paths(photo_folder(BENCH_DIR / "photos", args.images), args.images)
    cores = pipeline.default_workers()
    draft_size = clip.preprocess.draft_size if args.fast_decode else None
    print(f"{len(paths)} photos, {args.dtype}, {'fast' if args.fast_decode else 'exact'} decode, batch size "
          f"{args.batch_size}, {cores} cores, torch default threads {torch.get_num_threads()}, malloc "
          f"{'keep_freed_memory()' if kept else 'default'}")

    def decode_threads(workers: int) -> int:
        with ThreadPoolExecutor(workers) as pool:
            return sum(1 for _ in pool.map(
                lambda path: preprocess(load_image(Path(path), draft_size=draft_size), clip.preprocess), paths))

    processes = ProcessPoolExecutor(cores, mp_context=multiprocessing.get_context("forkserver"))
    started = time.perf_counter()
    list(processes.map(decode_in_process, paths[:cores], [clip.preprocess] * cores, [draft_size] * cores))
    process_startup = time.perf_counter() - started

    def process_batches() -> Iterator[list[np.ndarray]]:
        for start in range(0, len(paths), args.batch_size):
            chunk = paths[start:start + args.batch_size]
            arrays = processes.map(decode_in_process, chunk, [clip.preprocess] * len(chunk),
                                   [draft_size] * len(chunk))
            yield list(arrays)

    def decode_processes() -> int:
        return sum(len(batch) for batch in process_batches())

    def model_only(threads: int) -> int:
        batch = [np.random.default_rng(0).standard_normal((3, 224, 224), dtype=np.float32)] * args.batch_size
        with torch_threads(threads):
            for start in range(0, len(paths), args.batch_size):
                clip.image_features(batch[:len(paths[start:start + args.batch_size])])
        return len(paths)

    def together(ahead: int, workers: int, threads: int) -> int:
        settings = pipeline.Settings(model=str(model_dir), device="cpu", dtype=args.dtype, fast_decode=args.fast_decode,
                                     batch_size=args.batch_size, workers=workers, ahead=ahead)
        with torch_threads(threads):
            return sum(len(b.paths) for b in pipeline.Session(settings, clip=clip).image_features(paths))

    def together_processes() -> int:
        return sum(len(clip.image_features(batch)) for batch in process_batches())

    cases: dict[str, Callable[[], int]] = {
        "decode only, 1 thread": lambda: decode_threads(1),
        f"decode only, {cores} threads": lambda: decode_threads(cores),
        f"decode only, {2 * cores} threads": lambda: decode_threads(2 * cores),
        f"decode only, {cores} processes": decode_processes,
        f"model only, torch {cores} threads": lambda: model_only(cores),
        "model only, torch 1 thread": lambda: model_only(1),
        f"between calls (ahead=0), decode {cores} threads, torch {cores} [default]": lambda: together(0, cores, cores),
        f"between calls (ahead=0), decode {cores} processes, torch {cores}": together_processes,
        f"overlapped (ahead=1), decode {cores} threads, torch {cores}": lambda: together(1, cores, cores),
        f"overlapped (ahead=1), decode {max(cores // 2, 1)} threads, torch {cores}":
            lambda: together(1, max(cores // 2, 1), cores),
        f"overlapped (ahead=1), decode {cores} threads, torch {max(cores // 2, 1)}":
            lambda: together(1, cores, max(cores // 2, 1)),
        f"overlapped (ahead=1), decode {max(cores // 2, 1)} threads, torch {max(cores - cores // 2, 1)}":
            lambda: together(1, max(cores // 2, 1), max(cores - cores // 2, 1)),
    }
    for run in cases.values():  # warm-up
        run()
    rates: dict[str, list[float]] = defaultdict(list)
    other_load = OtherLoad()
    for _ in range(args.rounds):
        for name, run in cases.items():
            if not args.no_wait:
                wait_until_quiet()
            with other_load:
                start = time.perf_counter()
                count = run()
                rates[name].append(count / (time.perf_counter() - start))
    processes.shutdown()
    print("images/s: median over rounds, [each round]")
    for name, values in rates.items():
        print(f"  {name:<70} {statistics.median(values):7.2f}  {[round(v, 1) for v in values]}")
    decode, model = (statistics.median(rates[f"decode only, {cores} threads"]),
                     statistics.median(rates[f"model only, torch {cores} threads"]))
    print(f"  decoding and model taking turns on all cores would give 1 / (1/decode + 1/model) = "
          f"{1 / (1 / decode + 1 / model):.2f}")
    print(f"  (process pool start-up, excluded above: {process_startup:.2f} s)")
    print(f"other processes' CPU use during the timed runs: median {statistics.median(other_load.samples):.2f}, "
          f"max {max(other_load.samples):.2f} cores")


if __name__ == "__main__":
    main()
