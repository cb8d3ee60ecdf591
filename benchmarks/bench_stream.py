"""How soon the first result reaches a reader: `clip classify FOLDER -f jsonl` into a pipe, time to the first row
against time to the last, side by side for a few batch sizes (rows are written and flushed per batch).

Builds (once, under .bench/) a tiny random-weight CLIP (2 layers, width 64, 224 px input) and small JPEGs, runs the
command as a subprocess with --no-index (every image computed), reads its stdout as it comes, and prints both times
and their ratio. Target: the first row within a few batches' time of the start, not at the end.

    .venv/bin/python benchmarks/bench_stream.py [--images 2000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_DIR, checkpoint, first_photos, photo_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="images in the run (default 2000)")
    parser.add_argument("--batch-sizes", default="8,32,128", help="batch sizes to compare (default 8,32,128)")
    args = parser.parse_args()

    model_dir = checkpoint(BENCH_DIR / "tiny-clip", tiny=True)
    photos = first_photos(photo_folder(BENCH_DIR / "small-photos", args.images, sizes=[(64, 64)]), args.images)
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        command = [sys.executable, "-m", "clipcli", "classify", str(photos), "-l", "cat,dog,rocket", "-f", "jsonl",
                   "--no-index", "--batch-size", str(batch), "-m", str(model_dir), "--device", "cpu"]
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None
        first = proc.stdout.readline()
        first_at = time.perf_counter() - start
        rows = 1 + sum(1 for _ in proc.stdout)
        proc.wait()
        end_at = time.perf_counter() - start
        if proc.returncode != 0 or not first or rows != args.images:
            raise SystemExit(f"clip classify exited {proc.returncode} with {rows} rows: {proc.stderr.read()[-500:]!r}")
        print(f"batch {batch:4d}: first row after {first_at:6.2f} s, last after {end_at:6.2f} s "
              f"(first/last {first_at / end_at:.3f}; {args.images} images)")


if __name__ == "__main__":
    main()
