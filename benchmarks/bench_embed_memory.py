"""Peak memory of `clip embed` does not grow with the number of images: 500 vs 5,000 small photos, written as .npy
or (--ext parquet) as .parquet.

Builds (once, under .bench/) a tiny random-weight CLIP (2 layers, width 64, 224 px input) and 5,000 64x64 JPEGs,
runs `clip embed` as a subprocess on the first 500 and on all 5,000, and prints each run's peak RSS (read with
getrusage(RUSAGE_CHILDREN) in a small launcher process) and their ratio. Target: within 10%.

    .venv/bin/python benchmarks/bench_embed_memory.py [--ext parquet]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_DIR, checkpoint, first_photos, photo_folder, run_measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=500, help="images in the small run (default 500)")
    parser.add_argument("--large", type=int, default=5000, help="images in the large run (default 5000)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each size; the lowest peak counts")
    parser.add_argument("--ext", choices=["npy", "parquet"], default="npy", help="the output format (default npy)")
    args = parser.parse_args()

    model_dir = checkpoint(BENCH_DIR / "tiny-clip", tiny=True)
    photos = photo_folder(BENCH_DIR / "small-photos", args.large, sizes=[(64, 64)])
    folders = {args.small: first_photos(photos, args.small), args.large: first_photos(photos, args.large)}

    peaks: dict[int, float] = {}
    with tempfile.TemporaryDirectory(dir=BENCH_DIR) as out:
        for count, folder in folders.items():
            target = Path(out) / f"emb-{count}.{args.ext}"
            command = [sys.executable, "-m", "clipcli", "embed", str(folder), "-o", str(target), "-m", str(model_dir),
                       "-q", "--device", "cpu", "--no-index"]
            runs = [run_measured(command) for _ in range(args.repeat)]
            rows = rows_in(target)
            if rows != count:
                raise SystemExit(f"clip embed wrote {rows} rows for {count} images")
            seconds = min(s for s, _ in runs)
            peaks[count] = min(rss for _, rss in runs)
            print(f"{count:6d} images: peak RSS {peaks[count]:7.1f} MiB   ({[round(r, 1) for _, r in runs]}), "
                  f"{count / seconds:6.1f} images/s including startup")
    ratio = peaks[args.large] / peaks[args.small]
    verdict = "flat" if ratio <= 1.10 else "GROWS"
    print(f"peak RSS ratio {args.large}/{args.small}: {ratio:.3f}  [target <= 1.10: {verdict}]")


def rows_in(target: Path) -> int:
    if target.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(target).metadata.num_rows
    return np.load(target, mmap_mode="r").shape[0]


if __name__ == "__main__":
    main()
