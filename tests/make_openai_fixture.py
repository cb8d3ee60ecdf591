"""Write tests/fixtures/openai-small/: a small OpenAI-format CLIP made by open_clip, and open_clip's outputs for it.

The tests never run this script: its output is committed, and they only read that. It exists so that anyone can see,
and redo, how the fixture was made. Run it once, from the repository root, in a throwaway environment outside the
repository (open_clip needs torchvision, which does not import beside the project's CPU torch wheel):

    python3 -m venv /tmp/ocvenv
    /tmp/ocvenv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/ocvenv/bin/pip install open_clip_torch==3.3.0        # also brings ftfy, regex, timm, ...
    /tmp/ocvenv/bin/python tests/make_openai_fixture.py
    rm -rf /tmp/ocvenv

then commit what it wrote. The committed files were made with exactly these versions (expected.json's `produced_by`
records them); another torch may draw different random weights, so rerunning means re-committing every file.

What it writes (the same kind of fixture as OpenAI's released `ViT-*.pt` files, only tiny, with random weights):

- `openai-small.jit.pt`: open_clip's `CLIP` model, built as `open_clip.build_model_from_openai_state_dict` builds
  OpenAI models (QuickGELU, class token pooling, argmax text pooling), given random weights from a fixed seed, cast
  with `open_clip.convert_weights_to_lp` (conv/linear/attention weights and biases and both projections in fp16,
  embeddings and layer norms in fp32, as OpenAI's `convert_weights`), then `torch.jit.script`-ed and saved. Its
  `state_dict()` has OpenAI's key names plus the `attn_mask` buffer. The architecture is implied by the tensor
  shapes only, as in the real files: vision width 64, 3 layers, patch 8, image 32; text width 16, 2 layers, context
  77, the full 49,408-token vocabulary; embedding dim 24. Both towers have one attention head, which is what
  OpenAI's rule (one head per 64 channels, at least one) infers from these widths. The fp32 token embedding
  (49,408 x 16) is most of the file's ~3.5 MB; a text width of 32 would double it.
- `images/`: the five photos of `sample_images/`, centre-cropped to a square and resized to 32x32 (bicubic) with
  Pillow, so that resizing and cropping to the model's input size are no-ops.
- `expected.npz`: open_clip's outputs in fp32 from the fp16-stored weights upcast to fp32 (what open_clip's
  `load_openai_model(..., precision="fp32")` does): `pixel_values` (5,3,32,32) from open_clip's eval transform,
  `input_ids` (10,77) from `open_clip.tokenize` (padded with 0), `image_embeds` (5,24) and `text_embeds` (10,24)
  before normalisation, `label_text_embeds` (6,24) for `template` x `labels`, `probs` (5,6) = softmax over labels of
  exp(logit_scale) * cosine, and `logit_scale` (the raw, log-scale parameter).
- `expected.json`: image order, texts, labels, template, architecture, versions, notes.

open_clip's own `load_openai_model` cannot read this archive back: it infers the text heads as width // 64 with no
floor of one, i.e. 0 heads for width 16. So the reference model is built here with the heads given explicitly, and
the archive's weights are loaded into it with `load_state_dict(strict=True)`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import open_clip
import PIL
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, convert_weights_to_lp
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "fixtures" / "openai-small"
SEED = 0

EMBED_DIM = 24
VISION = dict(width=64, layers=3, patch_size=8, image_size=32)  # heads = width // head_width (64) = 1
TEXT = dict(width=16, layers=2, heads=1, context_length=77, vocab_size=49408)

# sample_images/ file -> its name in the fixture.
IMAGES = {"astronaut.png": "astronaut.png", "cat-chelsea.png": "chelsea.png", "coffee.png": "coffee.png",
          "horse.png": "horse.png", "rocket.jpg": "rocket.png"}
# Awkward on purpose: empty, accents and ampersand, CJK, emoji, runs of spaces and tabs.
TEXTS = ["a photo of a cat.", "a cup of coffee on a table", "An ASTRONAUT in a white suit!", "rocket launch at night",
         "a black horse silhouette", "", "café crème & croissant", "猫の写真", "a photo of a dog 🐶",
         "  many   spaces\tand\ttabs\n"]
LABELS = ["cat", "coffee", "astronaut", "rocket", "horse", "dog"]
TEMPLATE = "a photo of a {}."
LOGIT_SCALE = math.log(40.0)  # not open_clip's init value (log(1/0.07)), so a test can see that it is read


def build_clip() -> CLIP:
    """open_clip's CLIP in fp32, as build_model_from_openai_state_dict builds it, with heads given explicitly."""
    return CLIP(EMBED_DIM, vision_cfg=CLIPVisionCfg(**VISION), text_cfg=CLIPTextCfg(**TEXT), quick_gelu=True).eval()


def randomize(model: CLIP, seed: int) -> None:
    """Give every parameter a random value that matters.

    open_clip's init leaves layer norms at 1/0, biases at 0 and embeddings tiny, so a reader that swapped a norm's
    weight and bias, or dropped a bias, would still match; and near-identical embeddings for every input would hide
    a wrong pooling position. Matrices get std 1/sqrt(fan_in), so activations stay of order one through the blocks.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            leaf = name.rsplit(".", 1)[-1]
            if name == "logit_scale":
                param.fill_(LOGIT_SCALE)
            elif "ln_" in name:  # ln_pre, ln_1, ln_2, ln_post, ln_final
                param.copy_(1 + 0.2 * noise if leaf == "weight" else 0.1 * noise)
            elif name in ("token_embedding.weight", "positional_embedding", "visual.positional_embedding",
                          "visual.class_embedding"):
                param.copy_(0.3 * noise)
            elif name in ("text_projection", "visual.proj"):  # (in, out): x @ proj
                param.copy_(noise / math.sqrt(param.shape[0]))
            elif param.dim() >= 2:  # nn.Linear / nn.Conv2d / in_proj weights: (out, in, ...)
                param.copy_(noise / math.sqrt(param[0].numel()))
            else:  # biases
                param.copy_(0.05 * noise)


def write_images(folder: Path) -> list[Path]:
    """sample_images/ centre-cropped to squares and resized to 32x32 RGB PNGs; returns them in IMAGES order."""
    folder.mkdir(parents=True, exist_ok=True)
    size = VISION["image_size"]
    paths = []
    for source, name in IMAGES.items():
        with Image.open(REPO / "sample_images" / source) as image:
            image = image.convert("RGBA")
        rgb = Image.new("RGBA", image.size, (255, 255, 255, 255))
        rgb.alpha_composite(image)  # horse.png has an alpha channel: flatten it onto white
        width, height = rgb.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        square = rgb.convert("RGB").crop((left, top, left + side, top + side))
        square.resize((size, size), Image.BICUBIC).save(folder / name)
        paths.append(folder / name)
    return paths


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)  # open_clip's own init draws from the global generator before randomize() overwrites it

    # 1. The archive: random weights, cast as OpenAI's files are, scripted like the released ViT-*.pt files.
    model = build_clip()
    randomize(model, SEED)
    convert_weights_to_lp(model, dtype=torch.float16)
    archive = OUT / "openai-small.jit.pt"
    torch.jit.save(torch.jit.script(model), str(archive))

    # 2. The reference: the archive's weights read back, upcast to fp32, in a fresh fp32 open_clip model.
    state = {k: v.float() for k, v in torch.jit.load(str(archive), map_location="cpu").state_dict().items()}
    reference = build_clip()
    assert torch.equal(state.pop("attn_mask"), reference.attn_mask)  # a buffer, not a weight
    reference.load_state_dict(state, strict=True)
    stored = {k: v.dtype for k, v in model.state_dict().items()}
    assert stored["token_embedding.weight"] == torch.float32 and stored["visual.proj"] == torch.float16

    # 3. open_clip's preprocessing, tokenizer and features.
    paths = write_images(OUT / "images")
    transform = open_clip.image_transform(VISION["image_size"], is_train=False)
    pixel_values = torch.stack([transform(Image.open(p)) for p in paths])
    input_ids = open_clip.tokenize(TEXTS)
    with torch.no_grad():
        image_embeds = reference.encode_image(pixel_values)
        text_embeds = reference.encode_text(input_ids)
        label_text_embeds = reference.encode_text(open_clip.tokenize([TEMPLATE.format(label) for label in LABELS]))
        cosine = F.normalize(image_embeds, dim=-1) @ F.normalize(label_text_embeds, dim=-1).T
        probs = (reference.logit_scale.exp() * cosine).softmax(dim=-1)
    arrays = dict(pixel_values=pixel_values, input_ids=input_ids.long(), image_embeds=image_embeds,
                  text_embeds=text_embeds, label_text_embeds=label_text_embeds, probs=probs,
                  logit_scale=reference.logit_scale.detach())
    np.savez(OUT / "expected.npz", **{k: v.numpy() for k, v in arrays.items()})

    meta = {
        "images": [p.name for p in paths],
        "texts": TEXTS,
        "labels": LABELS,
        "template": TEMPLATE,
        "image_size": VISION["image_size"],
        "architecture": {
            "embed_dim": EMBED_DIM,
            "vision": {"width": VISION["width"], "layers": VISION["layers"],
                       "heads": VISION["width"] // CLIPVisionCfg().head_width, "patch_size": VISION["patch_size"],
                       "image_size": VISION["image_size"]},
            "text": TEXT,
            "activation": "quick_gelu",
        },
        "produced_by": f"tests/make_openai_fixture.py (seed {SEED}): open_clip {open_clip.__version__}, "
                       f"torch {torch.__version__}, Pillow {PIL.__version__}",
        "notes": [
            "weights are stored in fp16 where OpenAI's release does; expected outputs use them upcast to fp32",
            "input_ids: open_clip's tokenizer, padded with 0 to 77; pooled at argmax (end-of-text)",
            "images are sample_images/ centre-cropped and resized to the model's native size, so resize and crop "
            "are no-ops",
        ],
    }
    (OUT / "expected.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")
    print(np.round(probs.numpy(), 3))


if __name__ == "__main__":
    main()
