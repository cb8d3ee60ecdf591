"""Turn a `--model` value (local directory, checkpoint file, or Hugging Face Hub id) into local files, or raise a
UsageError that says how to supply a model. The only module that talks to the Hub."""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from clipcli.errors import UsageError

DEFAULT_MODEL = "openai/clip-vit-base-patch32"
# In the order transformers prefers them; the .index.json files list the shards of a sharded checkpoint.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
OPTIONAL_FILES = (*TOKENIZER_FILES, "preprocessor_config.json")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

# The names open_clip and OpenAI's clip.load give the OpenAI releases, for the Hub ids of the same weights.
ALIASES = {
    "ViT-B-32": "openai/clip-vit-base-patch32",
    "ViT-B-16": "openai/clip-vit-base-patch16",
    "ViT-L-14": "openai/clip-vit-large-patch14",
    "ViT-L-14-336": "openai/clip-vit-large-patch14-336",
}
_WHAT_TO_PASS = (f"pass a Hugging Face CLIP directory, an OpenAI-format .pt file, a Hub id such as {DEFAULT_MODEL} "
                 f"or one of {', '.join(ALIASES)} (`clip models` lists what is cached)")


def alias_target(spec: str) -> str | None:
    """The Hub id an alias stands for (any case; OpenAI's spelling ViT-B/32, ViT-L/14@336px too), else None."""
    key = spec.strip().lower().replace("/", "-").replace("@336px", "-336")
    return next((hub_id for alias, hub_id in ALIASES.items() if alias.lower() == key), None)


def canonical_name(spec: str) -> str:
    """The model id to record in outputs: the Hub id for an alias, else `spec` as given. A local file or folder of
    an alias's name is what resolve() loads, so it keeps its own name."""
    if os.path.lexists(os.path.expanduser(spec)):
        return spec
    return alias_target(spec) or spec


@dataclass(frozen=True)
class ModelFiles:
    """Where a model's files are: a Hugging Face layout directory, or a single checkpoint file."""

    spec: str  # what the user gave
    directory: Path | None  # HF layout: config.json, weights, tokenizer/preprocessor files
    checkpoint: Path | None  # a single file: OpenAI/OpenCLIP format, or an HF state dict without config


def resolve(spec: str, offline: bool = False) -> ModelFiles:
    """Local directory, local file, or Hub id (cache first, then download unless offline) -> ModelFiles."""
    if not spec.strip():
        raise UsageError("the model name is empty; " + _WHAT_TO_PASS)
    path = Path(spec).expanduser()
    if path.is_dir():
        return ModelFiles(spec, _check_directory(path), None)
    if path.is_file():
        if path.name in WEIGHT_FILES and (path.parent / "config.json").is_file():
            # The weights file of a Hugging Face directory: its config.json (heads, activation), tokenizer and
            # preprocessing beside it are the model's too; shapes alone cannot tell them.
            return ModelFiles(spec, path.parent, None)
        return ModelFiles(spec, None, path)
    if path.exists():
        raise UsageError(f"model '{spec}' is neither a regular file nor a directory")
    target = alias_target(spec)
    if target is not None:
        return ModelFiles(spec, _hub_snapshot(target, offline, f"'{spec}' ({target})"), None)
    looks_local = spec.startswith((".", "/", "~")) or spec.endswith(CHECKPOINT_SUFFIXES) or spec.count("/") > 1
    if looks_local or not _HUB_ID.fullmatch(spec):
        raise UsageError(f"model '{spec}' not found: no such file or directory; " + _WHAT_TO_PASS)
    return ModelFiles(spec, _hub_snapshot(spec, offline), None)


def weights_file(files: ModelFiles) -> Path:
    """The checkpoint file itself, or the directory's weights file (the first of WEIGHT_FILES it has)."""
    if files.directory is None:
        assert files.checkpoint is not None
        return files.checkpoint
    return next(files.directory / n for n in WEIGHT_FILES if (files.directory / n).is_file())


def model_file_roles(files: ModelFiles) -> list[tuple[str, Path]]:
    """(role, path) of every file that decides what the model computes: weights (and shards), config, tokenizer,
    preprocessing. A model's identity for the embedding index is the content of these."""
    weights = weights_file(files)
    roles = [("weights", weights)]
    roles += [(f"shard {name}", weights.parent / name) for name in sorted(set(shard_map(weights).values()))]
    if files.directory is not None:
        roles += [(name, files.directory / name) for name in ("config.json", *OPTIONAL_FILES)
                  if (files.directory / name).is_file()]
    return roles


def _check_directory(directory: Path) -> Path:
    if not (directory / "config.json").is_file():
        raise UsageError(f"model directory '{directory}' has no config.json; pass a Hugging Face CLIP directory "
                         "(config.json + model.safetensors), or convert a checkpoint with `clip convert-weights`")
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        raise UsageError(f"model directory '{directory}' has no model.safetensors or pytorch_model.bin (nor a "
                         "sharded .index.json); copy the weights beside config.json")
    return directory


def _hub_snapshot(repo_id: str, offline: bool, shown: str | None = None) -> Path:
    """The local snapshot folder of a Hub repo holding config.json, one weights file and the optional files.
    `shown`: how messages name the model (an alias with its Hub id), else 'repo_id'."""
    import huggingface_hub
    from huggingface_hub import constants, errors

    cached = _cached_snapshot(repo_id)
    if cached is not None:
        return cached
    shown = shown or f"'{repo_id}'"
    how = ("connect to the internet once so it can be downloaded into the Hugging Face cache, or pass "
           "--model with a local CLIP directory or OpenAI .pt file (`clip convert-weights` makes one)")
    if offline or constants.HF_HUB_OFFLINE:
        raise UsageError(f"model {shown} is not in the local Hugging Face cache and offline mode is "
                         f"on; {how}")
    quiet = logging.getLogger("huggingface_hub")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its retry warnings would break our one-line error rule
    try:
        # One HEAD request without retries first, so that being offline is reported in seconds, not after backoff.
        huggingface_hub.get_hf_file_metadata(huggingface_hub.hf_hub_url(repo_id, "config.json"))
        config = Path(huggingface_hub.hf_hub_download(repo_id, "config.json"))
        for name in WEIGHT_FILES:
            try:
                weights = Path(huggingface_hub.hf_hub_download(repo_id, name))
            except errors.EntryNotFoundError:
                continue
            for shard in sorted(set(shard_map(weights).values())):
                huggingface_hub.hf_hub_download(repo_id, shard)
            break
        else:
            raise UsageError(f"Hub repo '{repo_id}' has no model.safetensors or pytorch_model.bin; "
                             "it is not a transformers CLIP checkpoint")
        for name in OPTIONAL_FILES:
            try:
                huggingface_hub.hf_hub_download(repo_id, name)
            except errors.EntryNotFoundError:
                pass
    except (errors.RepositoryNotFoundError, errors.GatedRepoError) as err:
        raise UsageError(f"model {shown} is not available on the Hugging Face Hub "
                         f"({type(err).__name__}); check the id, or log in with `hf auth login` for a gated "
                         "repo") from None
    except UsageError:
        raise
    except Exception as err:  # network failures surface as many types (httpx, OSError, LocalEntryNotFoundError)
        raise UsageError(f"model {shown} is not in the local Hugging Face cache and the Hub cannot be "
                         f"reached ({type(err).__name__}); {how}") from None
    finally:
        quiet.setLevel(level)
    return config.parent


def _cached_snapshot(repo_id: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(config, str):
        return None
    snapshot = Path(config).parent
    for name in WEIGHT_FILES:
        weights = try_to_load_from_cache(repo_id, name)
        if isinstance(weights, str):
            try:
                shards = set(shard_map(Path(weights)).values())
            except UsageError:
                return None  # a damaged index: download it again
            if all(isinstance(try_to_load_from_cache(repo_id, shard), str) for shard in shards):
                return snapshot
    return None


def shard_map(weights: Path) -> dict[str, str]:
    """A sharded checkpoint's .index.json as {tensor name: shard file beside it}; {} for any other weights file."""
    if not weights.name.endswith(".index.json"):
        return {}
    try:
        weight_map = json.loads(weights.read_text(encoding="utf-8"))["weight_map"]
        names = set(weight_map.values())
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        raise UsageError(f"{weights}: not a readable shard index (JSON with a weight_map); download or copy it "
                         "again") from None
    if not names or not all(isinstance(n, str) and n and "/" not in n and "\\" not in n and n not in (".", "..")
                            for n in names):
        raise UsageError(f"{weights}: its weight_map must name shard files beside it; download or copy it again")
    return dict(weight_map)


@dataclass(frozen=True)
class CachedModel:
    """A CLIP checkpoint complete in the local Hugging Face cache: its Hub id, snapshot folder, size on disk and the
    aliases that name it."""

    repo_id: str
    snapshot: Path
    size_bytes: int
    aliases: tuple[str, ...]


def hub_cache() -> Path:
    """The Hugging Face cache folder in use (HF_HUB_CACHE, HF_HOME, or ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_models() -> list[CachedModel]:
    """The CLIP models (config.json with model_type clip, and a weights file) in the local Hugging Face cache, by
    id. Reads the cache only; never the network."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.utils import CacheNotFound

    try:
        cache = scan_cache_dir(hub_cache())
    except (CacheNotFound, OSError, ValueError):  # ValueError: the cache path is a file, not a folder
        return []
    found = []
    for repo in cache.repos:
        if repo.repo_type != "model":
            continue
        # The newest revision that is a complete CLIP checkpoint.
        for revision in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            snapshot = Path(revision.snapshot_path)
            if _is_clip_directory(snapshot):
                aliases = tuple(alias for alias, hub_id in ALIASES.items() if hub_id == repo.repo_id)
                found.append(CachedModel(repo.repo_id, snapshot, repo.size_on_disk, aliases))
                break
    return sorted(found, key=lambda model: model.repo_id.lower())


def _is_clip_directory(directory: Path) -> bool:
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    if not isinstance(config, dict):
        return False
    clip = config.get("model_type") == "clip" or "CLIPModel" in (config.get("architectures") or [])
    return clip and any((directory / name).is_file() for name in WEIGHT_FILES)
