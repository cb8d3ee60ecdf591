"""CLIP's byte-level BPE on `tokenizers`: list[str] -> (N, T) int64 ids, and tokenizer file loading.

Ids match transformers' CLIPTokenizer (no ftfy or HTML clean-up, unlike openai/CLIP). Knows nothing of models.
"""

from __future__ import annotations

import copy
import gzip
import json
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import cast

import tokenizers
import torch
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from clipcli.errors import UsageError
from clipcli.fsutil import atomic_file, read_json

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
# transformers' CLIPTokenizer pattern: special tokens, contractions, letter runs, single digits, symbol runs.
_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# openai/CLIP keeps merges[1:49152-256-2+1]: 256 bytes + 256 "</w>" bytes + merges + 2 specials = 49408 tokens.
_BUNDLED_MERGES = 49152 - 256 - 2
_REFETCH = "re-download the tokenizer files"


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes, in openai/CLIP's `bytes_to_unicode()` order (printable bytes first)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]


def _build_backend(vocab: dict[str, int], merges: list[tuple[str, str]], source: str) -> tokenizers.Tokenizer:
    """A `tokenizers.Tokenizer` wired exactly as transformers 5 builds CLIPTokenizer around `vocab` and `merges`."""
    if not (isinstance(vocab, dict) and BOS in vocab and EOS in vocab):
        raise UsageError(f"{source}: not a CLIP vocabulary (no {BOS!r} or {EOS!r}); use a CLIP checkpoint's tokenizer")
    try:
        model = BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                    fuse_unk=False, unk_token=EOS)
    except Exception as error:  # tokenizers raises bare Exception, e.g. for merged tokens missing from vocab
        raise UsageError(f"{source}: not a usable BPE vocabulary ({error}); {_REFETCH}") from None
    backend = tokenizers.Tokenizer(model)
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    # As transformers does: a literal "<|endoftext|>" in a text is the special token, matched before lowercasing.
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in (BOS, EOS)])
    backend.post_processor = processors.RobertaProcessing(
        (EOS, vocab[EOS]), (BOS, vocab[BOS]), trim_offsets=False, add_prefix_space=False)
    return backend


def _read_text(path: Path) -> str:
    """A UTF-8 file's text, or UsageError naming the file."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read {path}: {error}; {_REFETCH}") from None


def _parse_merges(lines: Sequence[object], source: Path) -> list[tuple[str, str]]:
    """Merges as "a b" strings (merges.txt, older tokenizer.json) or [a, b] pairs (newer tokenizer.json)."""
    pairs = [tuple(line.split(" ")) if isinstance(line, str) else tuple(line) if isinstance(line, list) else ()
             for line in lines]
    # Checked in one pass over the pairs (49,000 of them are read on every run that encodes texts).
    if not all(len(pair) == 2 and type(pair[0]) is str and type(pair[1]) is str for pair in pairs):
        number = next(number for number, pair in enumerate(pairs, start=1)
                      if not (len(pair) == 2 and all(isinstance(part, str) for part in pair)))
        raise UsageError(f"{source}: merge {number} is not a pair of tokens; {_REFETCH}")
    return cast("list[tuple[str, str]]", pairs)  # checked above: pairs of str


def _read_vocab_and_merges(directory: Path) -> tuple[dict[str, int], list[tuple[str, str]], Path]:
    """Vocab and merges of tokenizer.json, else of vocab.json + merges.txt; the file they came from."""
    if (directory / "tokenizer.json").is_file():
        # Only the BPE tables are taken; the pipeline, padding and truncation are ours, as transformers 5 does.
        source = directory / "tokenizer.json"
        model = read_json(source, _REFETCH)
        model = model.get("model") if isinstance(model, dict) else None
        if not (isinstance(model, dict) and model.get("type") == "BPE" and isinstance(model.get("vocab"), dict)
                and isinstance(model.get("merges"), list)):
            raise UsageError(f"{source}: not a BPE tokenizer (no model.vocab/merges); use a CLIP tokenizer.json")
        return model["vocab"], _parse_merges(model["merges"], source), source
    source, merges_file = directory / "vocab.json", directory / "merges.txt"
    if not (source.is_file() and merges_file.is_file()):
        raise UsageError(f"no tokenizer in {directory}: need tokenizer.json, or vocab.json and merges.txt; "
                         "use a checkpoint directory that has them")
    lines = _read_text(merges_file).splitlines()
    lines = lines[1:] if lines and lines[0].startswith("#version") else lines  # only this header, as `tokenizers`
    vocab = read_json(source, _REFETCH)
    if not isinstance(vocab, dict):
        raise UsageError(f"{source}: not a CLIP vocabulary (expected a JSON object); {_REFETCH}")
    return vocab, _parse_merges([line for line in lines if line], merges_file), source


class ClipTokenizer:
    """CLIP text tokenizer: texts -> BOS ... EOS ids, truncated to `context_length`, padded to the longest row."""

    def __init__(self, backend: tokenizers.Tokenizer, context_length: int, pad_token: str = EOS, *,
                 own: bool = False) -> None:
        if context_length < 2:
            raise UsageError(f"context length {context_length} leaves no room for BOS and EOS; use at least 2")
        ids: dict[str, int] = {}
        for token in (BOS, EOS, pad_token):
            token_id = backend.token_to_id(token)
            if token_id is None:
                raise UsageError(f"the tokenizer vocabulary has no {token!r}; use the tokenizer of a CLIP checkpoint")
            ids[token] = token_id
        self.context_length = context_length
        self._ids, self._pad_token = ids, pad_token
        # Our own copy, so the caller's backend is left as it was and its padding/truncation never apply (`own`: the
        # backend was built for this tokenizer alone, and copying it would cost a tenth of a second).
        self._backend = backend if own else copy.deepcopy(backend)
        # The cut of transformers' truncation=True, max_length=context_length: text tokens go, BOS and EOS stay.
        self._backend.enable_truncation(max_length=context_length)
        self._backend.enable_padding(pad_id=ids[pad_token], pad_token=pad_token)  # to the batch's longest row

    @classmethod
    def from_files(cls, directory: Path, context_length: int) -> ClipTokenizer:
        """Load tokenizer.json, else vocab.json + merges.txt; the pad token comes from tokenizer_config.json."""
        directory = Path(directory)
        vocab, merges, source = _read_vocab_and_merges(directory)
        pad_token = EOS  # transformers' default; openai/clip-* configs say the same, LAION ones say "!"
        if (directory / "tokenizer_config.json").is_file():
            config = read_json(directory / "tokenizer_config.json", _REFETCH)
            pad = config.get("pad_token") if isinstance(config, dict) else None
            pad = pad.get("content") if isinstance(pad, dict) else pad  # older files store an AddedToken dict
            pad_token = pad if isinstance(pad, str) else EOS
        return cls(_build_backend(vocab, merges, str(source)), context_length, pad_token=pad_token, own=True)

    @classmethod
    def bundled(cls, context_length: int = 77) -> ClipTokenizer:
        """OpenAI's CLIP tokenizer (49408 tokens) built from the merges file shipped in clipcli/data."""
        data = (files("clipcli") / "data" / "bpe_simple_vocab_16e6.txt.gz").read_bytes()
        lines = gzip.decompress(data).decode("utf-8").split("\n")[1:_BUNDLED_MERGES + 1]  # line 0 is "#version"
        merges = [(first, second) for first, second in map(str.split, lines)]
        symbols = _byte_symbols()
        tokens = [*symbols, *(s + "</w>" for s in symbols), *(a + b for a, b in merges), BOS, EOS]
        vocab = {token: index for index, token in enumerate(tokens)}
        return cls(_build_backend(vocab, merges, "bundled bpe_simple_vocab_16e6.txt.gz"), context_length, own=True)

    @property
    def vocab_size(self) -> int:
        """One more than the largest id this tokenizer can produce: the token embedding rows a model needs."""
        return max(self._backend.get_vocab(with_added_tokens=True).values()) + 1

    @property
    def bos_token_id(self) -> int:
        """Id of <|startoftext|>, first in every row."""
        return self._ids[BOS]

    @property
    def eos_token_id(self) -> int:
        """Id of <|endoftext|>, last before padding in every row."""
        return self._ids[EOS]

    @property
    def pad_token_id(self) -> int:
        """Id after EOS in shorter rows; the model never reads it (causal attention, pooled at EOS)."""
        return self._ids[self._pad_token]

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> (N, T) int64 ids: BOS ... EOS then padding, T the longest row <= context_length; (0, 2) if N=0."""
        if not texts:
            return torch.empty((0, 2), dtype=torch.int64)  # the shortest possible row is BOS EOS
        return torch.tensor([encoding.ids for encoding in self._backend.encode_batch(list(texts))], dtype=torch.int64)

    def is_truncated(self, text: str) -> bool:
        """True when `text` has more tokens than fit in context_length alongside BOS and EOS."""
        return bool(self._backend.encode(text).overflowing)

    def save(self, directory: Path) -> None:
        """Write tokenizer.json and tokenizer_config.json, loadable here and by transformers' AutoTokenizer."""
        backend = copy.deepcopy(self._backend)
        backend.no_padding()  # the file, like the Hub's, carries no batch settings
        backend.no_truncation()
        # tokenizer_class makes AutoTokenizer pick CLIPTokenizer instead of a generic backend without a pad token.
        config = {"tokenizer_class": "CLIPTokenizer", "bos_token": BOS, "eos_token": EOS, "unk_token": EOS,
                  "pad_token": self._pad_token, "model_max_length": self.context_length}
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in (("tokenizer.json", backend.to_str(pretty=True)),
                           ("tokenizer_config.json", json.dumps(config, indent=2) + "\n")):
            with atomic_file(directory / name) as handle:  # a crash never leaves half a file
                handle.write(text)
