"""clip classify against transformers' zero-shot-image-classification pipeline, side by side on the same photos.

Builds (once, under .bench/) a random-weight ViT-B/32 checkpoint and a folder of synthetic JPEG photos at mixed
sizes (640x480 to 4000x3000, about 4 MP on average), then, in alternation for several rounds, measures images/s:

  - transformers' pipeline, fp32, batch_size=32 (--reference-batch-one adds batch_size=1), in-process;
  - our pipeline in-process (fp32 and bf16, each with exact and --fast-decode preprocessing);
    model loading is excluded on both sides;
  - both as subprocesses (`clip classify` and a `python -c` transformers script): startup and loading included;
  - the models alone on one batch of preprocessed photos (get_image_features vs encode_image, fp32 and bf16);

then prints the ratios with their targets, the top-1 agreement of bf16, fp16 and fast decode with fp32 exact
(and of transformers' bf16, the model cast whole, for comparison),
peak RSS, and how much CPU other processes took meanwhile. Targets are reported, never asserted: timings depend
on the machine and on whatever else runs on it. Needs transformers (pip install -e ".[test]").

    .venv/bin/python benchmarks/bench_classify.py --images 200 --rounds 3   # ~17 min on 2 cores; 60/2 for ~4 min
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BENCH_DIR,
    LABELS,
    OtherLoad,
    checkpoint,
    first_photos,
    image_paths,
    peak_rss_mb,
    photo_folder,
    run_measured,
    wait_until_quiet,
)

TEMPLATE = "a photo of a {}."


def cpu_summary() -> str:
    """CPU model, core count and the instruction-set extensions that decide bf16 speed."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16"]
    present = " ".join(f"{flag}:{'yes' if flag in flags else 'no'}" for flag in wanted)
    return f"{model}, {os.cpu_count()} logical CPUs; {present}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="photos to classify (default 200)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--batch-size", type=int, default=32, help="for both pipelines (default 32)")
    parser.add_argument("--reference-batch-one", action="store_true",
                        help="also time transformers' pipeline at batch_size=1 (slow)")
    parser.add_argument("--no-subprocess", action="store_true", help="skip the subprocess (cold start) runs")
    parser.add_argument("--no-wait", action="store_true",
                        help="start each timed run at once, not after other processes go quiet (up to 2 min)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="call process.keep_freed_memory() in this process, as the CLI should (it then applies "
                             "to transformers too; the subprocess runs are unaffected)")
    args = parser.parse_args()

    import torch
    import transformers
    from transformers import pipeline as hf_pipeline

    from clipcli import api, pipeline, scoring
    from clipcli.loader import Clip, load
    from clipcli.preprocess import load_image, preprocess
    from clipcli.process import keep_freed_memory

    def session(clip: Clip, dtype: str, fast: bool) -> pipeline.Session:
        """No index: every run computes (this measures the engine, not the index)."""
        return pipeline.Session(pipeline.Settings(model=str(model_dir), device="cpu", dtype=dtype, fast_decode=fast,
                                                  batch_size=args.batch_size), clip=clip)

    kept = keep_freed_memory() if args.keep_freed_memory else False
    model_dir = checkpoint(BENCH_DIR / "vit-b-32")
    folder = first_photos(photo_folder(BENCH_DIR / "photos", args.images), args.images)
    paths = image_paths(folder, args.images)
    sizes = sorted((load_image(Path(p)).size for p in paths), key=lambda s: s[0] * s[1])
    print(f"cpu: {cpu_summary()}")
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}), "
          f"transformers {transformers.__version__}, python {platform.python_version()}; in-process malloc: "
          f"{'keep_freed_memory()' if kept else 'default'}")
    mean_mp = np.mean([w * h for w, h in sizes]) / 1e6
    print(f"random-weight ViT-B/32 ({model_dir}); {len(paths)} JPEG q90 photos ({folder}), "
          f"{sizes[0][0]}x{sizes[0][1]} to {sizes[-1][0]}x{sizes[-1][1]}, mean {mean_mp:.1f} MP; "
          f"{len(LABELS)} labels, template '{TEMPLATE}', batch size {args.batch_size}")

    clips = {dtype: load(str(model_dir), device="cpu", dtype=dtype) for dtype in ("fp32", "bf16")}
    reference = hf_pipeline("zero-shot-image-classification", model=str(model_dir), device="cpu")
    hf_models = {"fp32": transformers.CLIPModel.from_pretrained(model_dir).eval(),
                 "bf16": transformers.CLIPModel.from_pretrained(model_dir, dtype=torch.bfloat16).eval()}

    top1: dict[str, list[str]] = {}  # transformers' top label per image, from its last run

    def ours(dtype: str, fast: bool) -> Callable[[list[str]], int]:
        def run(images: list[str]) -> int:
            run_session = session(clips[dtype], dtype, fast)
            label_set = pipeline.label_embeddings(run_session, LABELS, [TEMPLATE])
            return sum(len(b.paths) for b in pipeline.classify(run_session, images, label_set))
        return run

    def transformers_pipeline(batch_size: int) -> Callable[[list[str]], int]:
        def run(images: list[str]) -> int:
            results = reference(images, candidate_labels=LABELS, hypothesis_template=TEMPLATE, batch_size=batch_size)
            top1[f"transformers fp32 bs{batch_size}"] = [r[0]["label"] for r in results]
            return len(results)
        return run

    end_to_end: dict[str, Callable[[list[str]], int]] = {"transformers fp32 bs32": transformers_pipeline(32)}
    if args.reference_batch_one:
        end_to_end["transformers fp32 bs1"] = transformers_pipeline(1)
    for dtype in ("fp32", "bf16"):
        for fast in (False, True):
            end_to_end[f"ours {dtype} {'fast' if fast else 'exact'}"] = ours(dtype, fast)

    # Model-only: one batch of real preprocessed photos, the same tensor for both implementations.
    pixels = torch.stack([torch.from_numpy(preprocess(load_image(Path(p)), clips["fp32"].preprocess))
                          for p in (paths * args.batch_size)[:args.batch_size]])  # (B, 3, 224, 224) float32

    def model_only(which: str, dtype: str) -> Callable[[], int]:
        if which == "ours":  # float32 pixels in, the image tower under autocast for bf16 (as the pipeline runs it)
            return lambda: clips[dtype].batch_features(pixels).shape[0]
        batch = pixels.to(hf_models[dtype].dtype)  # transformers' usual bf16: the whole model cast
        return lambda: _features(hf_models[dtype].get_image_features(pixel_values=batch)).shape[0]

    models = {f"{which} {dtype}": model_only(which, dtype) for dtype in ("fp32", "bf16")
              for which in ("transformers", "ours")}

    clip_command = [sys.executable, "-m", "clipcli", "classify", str(folder), "-l", ",".join(LABELS), "-t", TEMPLATE,
                    "-m", str(model_dir), "-f", "jsonl", "-q", "--batch-size", str(args.batch_size),
                    "--device", "cpu", "--no-index"]
    hf_script = ("import sys, glob; from transformers import pipeline; "
                 "p = pipeline('zero-shot-image-classification', model=sys.argv[1], device='cpu'); "
                 "r = p(sorted(glob.glob(sys.argv[2] + '/*.jpg')), candidate_labels=sys.argv[3].split(','), "
                 "hypothesis_template=sys.argv[4], batch_size=int(sys.argv[5])); print(len(r))")
    children: dict[str, list[str]] = {} if args.no_subprocess else {
        "transformers fp32 bs32": [sys.executable, "-c", hf_script, str(model_dir), str(folder), ",".join(LABELS),
                                   TEMPLATE, str(args.batch_size)],
        "clip classify fp32": clip_command,
        "clip classify bf16 --fast-decode": [*clip_command, "--dtype", "bf16", "--fast-decode"],
    }
    startup_command = [*clip_command[:4], paths[0], *clip_command[5:]]  # one image: start, load, exit

    # Warm-up: thread pools, oneDNN kernels and first-call allocations stay out of the timings.
    with torch.inference_mode():
        for run in end_to_end.values():
            run(paths[:2])
        for run_model in models.values():
            run_model()

    rates: dict[str, list[float]] = defaultdict(list)
    child_rss: dict[str, float] = {}
    other_load = OtherLoad()

    def quiet() -> None:
        if not args.no_wait:
            wait_until_quiet()

    for round_index in range(args.rounds):
        for name, run in end_to_end.items():
            quiet()
            with other_load:
                start = time.perf_counter()
                count = run(paths)
                rates[name].append(count / (time.perf_counter() - start))
        with torch.inference_mode():
            for name, run_model in models.items():
                quiet()
                with other_load:
                    start = time.perf_counter()
                    count = run_model()
                    rates[f"model-only {name}"].append(count / (time.perf_counter() - start))
        for name, command in children.items():
            quiet()
            with other_load:
                seconds, rss = run_measured(command)
            rates[f"subprocess {name}"].append(len(paths) / seconds)
            child_rss[name] = max(child_rss.get(name, 0.0), rss)
        print(f"round {round_index + 1}/{args.rounds} done", flush=True)
    startup = [run_measured(startup_command)[0] for _ in range(2)] if children else []

    print("\nimages/s: median over rounds, [each round]")
    for name, values in rates.items():
        print(f"  {name:<52} {statistics.median(values):7.2f}  {[round(v, 2) for v in values]}")
    if startup:
        print(f"  (clip classify on 1 image, i.e. start + load + exit: {min(startup):.2f} s)")

    def ratio(a: str, b: str) -> float:
        # Paired per round, so a round slowed by other load slows both sides; median of the per-round ratios.
        return statistics.median(x / y for x, y in zip(rates[a], rates[b], strict=True))

    lines = [
        ("ours fp32 exact / transformers pipeline", "ours fp32 exact", "transformers fp32 bs32", ">= 1.8"),
        ("ours bf16 fast / transformers pipeline (fp32)", "ours bf16 fast", "transformers fp32 bs32", ">= 3.5"),
        ("ours bf16 exact / transformers pipeline (fp32)", "ours bf16 exact", "transformers fp32 bs32", ""),
        ("ours fp32 fast / transformers pipeline", "ours fp32 fast", "transformers fp32 bs32", ""),
        ("model-only ours / transformers, fp32", "model-only ours fp32", "model-only transformers fp32", ">= 1.0"),
        ("model-only ours / transformers, bf16", "model-only ours bf16", "model-only transformers bf16", ">= 1.0"),
        ("model-only ours bf16 / ours fp32", "model-only ours bf16", "model-only ours fp32", ""),
    ]
    for dtype in ("fp32", "bf16"):
        for mode in ("exact", "fast"):
            lines.append((f"end-to-end / model-only, ours {dtype} {mode}", f"ours {dtype} {mode}",
                          f"model-only ours {dtype}", ">= 0.85"))
    if args.reference_batch_one:
        lines.append(("ours fp32 exact / transformers pipeline bs1", "ours fp32 exact", "transformers fp32 bs1", ""))
    if children:
        lines.append(("subprocess: clip classify fp32 / transformers script", "subprocess clip classify fp32",
                      "subprocess transformers fp32 bs32", ""))
        lines.append(("subprocess: clip classify bf16 fast / transformers script",
                      "subprocess clip classify bf16 --fast-decode", "subprocess transformers fp32 bs32", ""))
    print("\nratios: median of per-round ratios [target]")
    for text, a, b, target in lines:
        print(f"  {text:<58} {ratio(a, b):6.2f}  {f'[{target}]' if target else ''}")

    # Agreement with fp32 exact, outside the timings. fp16 runs here too: without AVX512-FP16 it is far slower
    # than fp32 on CPU, so it is timed once rather than in the rounds.
    variants = {"fp32 exact": (clips["fp32"], False), "fp32 fast": (clips["fp32"], True),
                "bf16 exact": (clips["bf16"], False), "bf16 fast": (clips["bf16"], True),
                "fp16 exact": (load(str(model_dir), device="cpu", dtype="fp16"), False)}
    features, probs = {}, {}
    for name, (clip, fast) in variants.items():
        start = time.perf_counter()
        dtype = name.split()[0]
        features[name] = np.concatenate([b.features for b in session(clip, dtype, fast).image_features(paths)])
        probs[name] = scoring.probabilities(features[name], api.label_embeddings(clip, LABELS, [TEMPLATE]),
                                            clip.logit_scale)
        if name == "fp16 exact":
            fp16_rate = len(paths) / (time.perf_counter() - start)
    base = probs["fp32 exact"]
    ranked = np.sort(base, axis=-1)
    margins = ranked[:, -1] - ranked[:, -2]  # top-1 minus top-2 probability, fp32 exact
    print(f"\nagreement with ours fp32 exact, {len(paths)} photos. Random weights score every label almost alike "
          f"(top-1 margin median {np.median(margins):.4f}, smallest {margins.min():.1e}), so near-ties flip easily:")
    print(f"  {'':<24} {'top-1':>7} {'max |dprob|':>12} {'min cosine':>11} {'largest flipped margin':>23}")
    hf_top1 = np.array([LABELS.index(label) for label in top1["transformers fp32 bs32"]])
    same = hf_top1 == base.argmax(-1)
    print(f"  {'transformers pipeline':<24} {same.mean():7.1%}")
    for name in list(variants)[1:]:
        flipped = probs[name].argmax(-1) != base.argmax(-1)
        cosine = (scoring.normalize(features[name]) * scoring.normalize(features["fp32 exact"])).sum(-1)
        worst = f"{margins[flipped].max():.1e}" if flipped.any() else "-"
        print(f"  {'ours ' + name:<24} {1 - flipped.mean():7.1%} {np.abs(probs[name] - base).max():12.1e} "
              f"{cosine.min():11.6f} {worst:>23}")
    # The same measure for transformers' bf16 (model cast whole, residual sums included), on the same pixels.
    exact_pixels = torch.stack([torch.from_numpy(preprocess(load_image(Path(p)), clips["fp32"].preprocess))
                                for p in paths])
    prompt_ids = clips["fp32"].tokenizer.encode([TEMPLATE.replace("{}", label) for label in LABELS])
    with torch.inference_mode():
        hf_rows = torch.cat([_features(hf_models["bf16"].get_image_features(pixel_values=chunk.to(torch.bfloat16)))
                             for chunk in exact_pixels.split(args.batch_size)]).float().numpy()
        hf_text = _features(hf_models["bf16"].get_text_features(input_ids=prompt_ids)).float().numpy()
    hf_probs = scoring.probabilities(hf_rows, scoring.normalize(hf_text), clips["fp32"].logit_scale)
    flipped = hf_probs.argmax(-1) != base.argmax(-1)
    cosine = (scoring.normalize(hf_rows) * scoring.normalize(features["fp32 exact"])).sum(-1)
    worst = f"{margins[flipped].max():.1e}" if flipped.any() else "-"
    print(f"  {'transformers bf16':<24} {1 - flipped.mean():7.1%} {np.abs(hf_probs - base).max():12.1e} "
          f"{cosine.min():11.6f} {worst:>23}")
    print(f"  (fp16 on this CPU: {fp16_rate:.2f} images/s, one run)")

    print("\npeak RSS")
    print(f"  {'this process (all models and runs above)':<52} {peak_rss_mb():7.0f} MiB")
    for name, rss in child_rss.items():
        print(f"  {'subprocess ' + name:<52} {rss:7.0f} MiB")
    if other_load.samples:
        print(f"\nother processes' CPU use during the timed runs: median {statistics.median(other_load.samples):.2f}, "
              f"max {max(other_load.samples):.2f} cores (of {os.cpu_count()})")


def _features(output):  # transformers 5 may wrap the features in an output object
    return getattr(output, "pooler_output", output)


if __name__ == "__main__":
    main()
