"""One-shot CUDA check (run on a machine with a GPU): parity of our CUDA fp32/fp16/bf16 paths with transformers,
`--device auto` choosing cuda + fp16, the CLI end to end on the GPU, and model-only throughput side by side.

    PYTHONPATH=. python3 benchmarks/gpu_check.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from clipcli import api
from clipcli.loader import load
from clipcli.preprocess import PreprocessConfig
from clipcli.tokenizer import ClipTokenizer


def checkpoint(directory: Path) -> Path:
    torch.manual_seed(0)
    transformers.CLIPModel(transformers.CLIPConfig()).save_pretrained(directory)  # ViT-B/32 dimensions
    ClipTokenizer.bundled().save(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(PreprocessConfig.for_image_size(224).to_json()))
    return directory


def timed(fn, repeats: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    assert torch.cuda.is_available(), "no CUDA device"
    print("device:", torch.cuda.get_device_name(), "torch", torch.__version__, "transformers", transformers.__version__)
    work = Path(tempfile.mkdtemp())
    model_dir = checkpoint(work / "vit-b-32")
    reference = transformers.CLIPModel.from_pretrained(model_dir).eval().cuda()
    torch.manual_seed(1)
    pixels = torch.randn(64, 3, 224, 224)
    ids = ClipTokenizer.bundled().encode(["a photo of a cat.", "a photo of a dog.", "a rocket launch at night"])
    with torch.no_grad():
        ref_image = reference.get_image_features(pixel_values=pixels.cuda())
        ref_image = getattr(ref_image, "pooler_output", ref_image).float().cpu()
        ref_text = reference.get_text_features(input_ids=ids.cuda())
        ref_text = getattr(ref_text, "pooler_output", ref_text).float().cpu()

    auto = load(str(model_dir), device="auto", dtype="auto")
    print("auto ->", auto.device, auto.dtype)
    for dtype in ("fp32", "fp16", "bf16"):
        clip = load(str(model_dir), device="cuda", dtype=dtype)
        with torch.inference_mode():
            image = torch.from_numpy(clip.batch_features(pixels.cuda()))
            text = clip.model.encode_text(ids.cuda()).float().cpu()
        cos = torch.nn.functional.cosine_similarity(image, ref_image).min().item()
        top1 = (image @ ref_text.T).argmax(-1).eq((ref_image @ ref_text.T).argmax(-1)).float().mean().item()
        print(f"{dtype}: max|image-ref| {(image - ref_image).abs().max():.2e} min cosine {cos:.6f} "
              f"max|text-ref| {(text - ref_text).abs().max():.2e} top-1 agreement {top1:.3f}")

    for dtype, torch_dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        clip = load(str(model_dir), device="cuda", dtype=dtype)
        ref = transformers.CLIPModel.from_pretrained(model_dir, dtype=torch_dtype).eval().cuda()
        batch = torch.randn(256, 3, 224, 224, device="cuda")
        with torch.inference_mode():
            ours_s = timed(lambda clip=clip, batch=batch: clip.batch_features(batch))
            ref_s = timed(lambda ref=ref, batch=batch, cast=torch_dtype: ref.get_image_features(
                pixel_values=batch.to(cast)))
        print(f"model-only {dtype}, batch 256: ours {256 / ours_s:.0f} img/s, transformers {256 / ref_s:.0f} img/s, "
              f"ratio {ref_s / ours_s:.2f}")

    images = Path("sample_images")
    run = subprocess.run([sys.executable, "-m", "clipcli", "classify", str(images), "-l",
                          "cat,rocket,coffee,astronaut,horse", "-m", str(model_dir), "--device", "cuda",
                          "-f", "jsonl", "--no-index"], capture_output=True, text=True)
    print("cli cuda exit", run.returncode, "rows", len(run.stdout.splitlines()), "stderr", run.stderr.strip()[:300])
    cpu = load(str(model_dir), device="cpu", dtype="fp32")
    gpu = load(str(model_dir), device="cuda", dtype="fp16")
    paths = sorted(str(p) for p in images.iterdir() if p.suffix in (".png", ".jpg"))
    labels = ["cat", "rocket", "coffee", "astronaut", "horse"]
    a, b = api.zero_shot(cpu, paths, labels), api.zero_shot(gpu, paths, labels)
    print(f"pipeline cuda fp16 vs cpu fp32: max prob diff {np.abs(a - b).max():.2e}, "
          f"top-1 equal {(a.argmax(1) == b.argmax(1)).mean():.3f}")


if __name__ == "__main__":
    main()
