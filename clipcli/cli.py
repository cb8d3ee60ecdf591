"""The `clip` command: each command parses its options, calls the pipeline, renders with output.py and chooses the
exit code. Process plumbing (signals, exit codes, one-line errors, stdout) lives in process.py. Heavy modules are
imported inside commands, so `clip --help` is fast and a run answered from the index imports no torch."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from clipcli.errors import UsageError
from clipcli.process import (
    EXIT_SOME_FAILED,
    OneLineErrors,
    eprint,
    handle_errors,
    install_signal_handlers,
    warn,
    write_stdout,
)

if TYPE_CHECKING:
    from clipcli.inputs import Failure
    from clipcli.pipeline import Session

DEFAULT_MODEL = "openai/clip-vit-base-patch32"  # also resolve.DEFAULT_MODEL; kept here to keep --help light

app = typer.Typer(
    name="clip",
    cls=OneLineErrors,
    help="Zero-shot image classification and embeddings with CLIP.\n\n"
    "Examples:\n\n"
    "  clip classify photos/ --labels cat,dog,car\n\n"
    "  clip embed photos/ -o emb.npy\n\n"
    "  clip convert-weights ViT-B-32.pt converted/",
    rich_markup_mode=None,  # plain-text usage errors ending in one "Error: ..." line
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"clip {version('clipcli')}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                         help="Show the version and exit.")] = False,
) -> None:
    """Zero-shot image classification and embeddings with CLIP."""


# ------------------------------------------------------------------------------------------------ shared options

ModelOpt = Annotated[str, typer.Option(
    "--model", "-m", envvar="CLIP_MODEL",
    help="Hugging Face CLIP directory, OpenAI-format .pt checkpoint, or Hub id.")]
DeviceOpt = Annotated[str, typer.Option(help="auto (cuda, then mps, then cpu), cpu, cuda or mps.")]
DtypeOpt = Annotated[str, typer.Option(
    help="auto (fp32 on CPU, identical to the reference; fp16 on CUDA), fp32, fp16 or bf16.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Images per model call.")]
WorkersOpt = Annotated[int | None, typer.Option(
    "--workers", min=1, help="Image decoding threads (default: one per CPU core).")]
FastOpt = Annotated[bool, typer.Option(
    "--fast-decode", help="Decode large JPEGs at reduced scale before the exact resize (faster, near-identical).")]
IndexOpt = Annotated[Path | None, typer.Option(
    "--index", envvar="CLIP_INDEX", show_default=False,
    help="The embedding index file [default: $XDG_CACHE_HOME/clipcli/index.db].")]
NoIndexOpt = Annotated[bool, typer.Option("--no-index", help="Neither read nor write the embedding index.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]
PathsArg = Annotated[list[str], typer.Argument(
    metavar="PATH", help="Image files and/or folders (walked recursively).", show_default=False)]


class Format(str, Enum):
    """--format values (output.FORMATS); an Enum so that Typer rejects others as a usage error and lists them."""

    table = "table"
    csv = "csv"
    json = "json"
    jsonl = "jsonl"


@contextmanager
def _session(model: str, device: str, dtype: str, fast_decode: bool, batch_size: int, workers: int | None,
             index: Path | None, no_index: bool) -> Iterator[Session]:
    """The run's Session, its index open for the run (none with --no-index)."""
    from clipcli.index import default_location, open_index
    from clipcli.pipeline import Session, Settings
    from clipcli.process import keep_freed_memory

    keep_freed_memory()  # process-wide malloc setting: this program's to choose, measured in benchmarks/README.md
    settings = Settings(model=model, device=device, dtype=dtype, fast_decode=fast_decode, batch_size=batch_size,
                        workers=workers)
    store = open_index(None if no_index else (index or default_location()), warn)
    try:
        yield Session(settings, store)
    finally:
        if store is not None:
            store.close()


# ------------------------------------------------------------------------------------------------ commands


@app.command()
@handle_errors
def classify(
    paths: PathsArg,
    labels: Annotated[list[str] | None, typer.Option(
        "--labels", "-l", help="Comma-separated labels: cat,dog,car (repeatable: -l cat -l dog).")] = None,
    labels_file: Annotated[Path | None, typer.Option(help="File with one label per line (- reads stdin).")] = None,
    template: Annotated[list[str] | None, typer.Option(
        "--template", "-t",
        help="Prompt template, {} is the label; repeat to ensemble. [default: a photo of a {}.]")] = None,
    templates: Annotated[str | None, typer.Option(help="A named template set: imagenet (the CLIP paper's 80).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Labels shown per image.")] = 5,
    fmt: Annotated[Format, typer.Option(
        "--format", "-f", help="table for people; csv, json or jsonl for programs.")] = Format.table,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write results here (default stdout; - is stdout too).")] = None,
    model: ModelOpt = DEFAULT_MODEL,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    workers: WorkersOpt = None,
    fast_decode: FastOpt = False,
    index: IndexOpt = None,
    no_index: NoIndexOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Score images against labels: which words fit which images.

    Examples:

      clip classify photos/ --labels cat,dog,car

      clip classify a.jpg b.png -l cat,dog --templates imagenet -f jsonl -o out.jsonl
    """
    import numpy as np

    from clipcli import output as out
    from clipcli import pipeline
    from clipcli.inputs import find_images

    label_list = _read_labels(labels, labels_file)
    out.check_labels_for(fmt.value, label_list)
    prompt_templates = _templates(template, templates)
    output = None if output is None or str(output) == "-" else output
    if output is not None:
        out.check_writable(output)
    images, failures = find_images(paths)
    _warn_if_no_images(images, failures)
    if output is not None:
        out.check_not_an_input([output], images)
    with _session(model, device, dtype, fast_decode, batch_size, workers, index, no_index) as session:
        label_set = pipeline.label_embeddings(session, label_list, prompt_templates)
        for label in label_set.truncated:
            warn(f"label '{label}' is longer than the model's {session.info.context_length}-token context and "
                 "was truncated")
        found: list[str] = []
        rows = []
        with out.progress_bar(len(images), quiet) as advance:
            for batch in pipeline.classify(session, images, label_set, progress=advance):
                found.extend(batch.paths)
                rows.append(batch.scores)
                failures.extend(batch.failures)
    scores = np.concatenate(rows) if rows else np.zeros((0, len(label_list)), dtype=np.float32)
    text = out.render(out.records(found, scores, label_list, top_k), label_list, fmt.value,
                      color=output is None and fmt is Format.table and sys.stdout.isatty())
    if output is None:
        write_stdout(text)
    else:
        out.write_text(output, text)
    _finish(failures)


@app.command()
@handle_errors
def embed(
    paths: Annotated[list[str] | None, typer.Argument(metavar="PATH", help="Image files and/or folders.",
                                                         show_default=False)] = None,
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="The .npy to write; PATHS go to <name>.paths.txt.")] = Path("embeddings.npy"),
    text: Annotated[list[str] | None, typer.Option(
        "--text", help="Embed this text instead of images (repeatable).")] = None,
    text_file: Annotated[Path | None, typer.Option(
        help="Embed each line of this file (blank lines skipped; - reads stdin).")] = None,
    no_normalize: Annotated[bool, typer.Option(
        "--no-normalize", help="Raw projected features, not L2-normalised.")] = False,
    model: ModelOpt = DEFAULT_MODEL,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    workers: WorkersOpt = None,
    fast_decode: FastOpt = False,
    index: IndexOpt = None,
    no_index: NoIndexOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write embeddings: float32 (N, D) .npy plus a .paths.txt sidecar (line i names row i).

    Examples:

      clip embed photos/ -o emb.npy

      clip embed --text "a cat" --text "a dog" -o text.npy
    """
    from clipcli import output as out
    from clipcli import pipeline
    from clipcli.inputs import find_images

    texts = list(text or []) + (_read_lines(text_file, "--text-file") if text_file else [])
    for item in texts:
        _check_utf8("--text", item)
    if (text or text_file) and paths:
        raise UsageError("give image PATHs or --text/--text-file, not both")
    if not (text or text_file) and not paths:
        raise UsageError("nothing to embed; pass image files/folders, or --text TEXT")
    if (text or text_file) and not texts:
        raise UsageError(f"{text_file} has no text lines; put one text per line")
    if str(output) == "-":
        raise UsageError("clip embed writes a .npy file and a sidecar beside it, not stdout; give a file name with -o")
    files = [output, out.sidecar_path(output)]
    for path in files:  # a .npy and its sidecar need real files
        out.check_writable(path, stream_ok=False)
    failures: list[Failure] = []
    images: list[str] = []
    if not texts:
        images, failures = find_images(paths or [])
        _warn_if_no_images(images, failures)
        out.check_not_an_input(files, images)
    with _session(model, device, dtype, fast_decode, batch_size, workers, index, no_index) as session:
        writer = out.EmbeddingWriter(output)
        try:
            if texts:
                embedded = pipeline.embed_texts(session, texts, normalized=not no_normalize)
                for item, truncated in zip(texts, embedded.truncated, strict=True):
                    if truncated:
                        warn(f"text '{item[:60]}{'…' if len(item) > 60 else ''}' is longer than the model's "
                             f"{session.info.context_length}-token context and was truncated")
                writer.add(embedded.texts, embedded.features)
            else:
                with out.progress_bar(len(images), quiet) as advance:
                    for batch in pipeline.embed_images(session, images, normalized=not no_normalize,
                                                       progress=advance):
                        writer.add(batch.paths, batch.features)
                        failures.extend(batch.failures)
            writer.close(session.info.projection_dim)
        except BaseException:
            writer.abort()
            raise
    _finish(failures)


@app.command("index")
@handle_errors
def index_command(
    paths: Annotated[list[str] | None, typer.Argument(
        metavar="PATH", help="Image files and/or folders to add or update.", show_default=False)] = None,
    info: Annotated[bool, typer.Option("--info", help="Show what the index holds (also without PATH).")] = False,
    prune: Annotated[bool, typer.Option("--prune", help="Forget files that are gone, and their embeddings.")] = False,
    clear: Annotated[bool, typer.Option("--clear", help="Remove every entry.")] = False,
    model: ModelOpt = DEFAULT_MODEL,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    workers: WorkersOpt = None,
    fast_decode: FastOpt = False,
    index: IndexOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Build or update the embedding index, or show, prune or clear it.

    Examples:

      clip index photos/            (embed what is new or changed; a summary line at the end)

      clip index                    (what the index holds: entries per model, size)

      clip index --prune            (forget files that no longer exist)
    """
    from clipcli import output as out
    from clipcli import pipeline
    from clipcli.index import Index, default_location
    from clipcli.inputs import find_images

    if sum((bool(paths), prune, clear)) > 1:
        raise UsageError("give PATHs to index, --prune or --clear, one at a time")
    location = index or default_location()
    if paths:
        images, failures = find_images(paths)
        _warn_if_no_images(images, failures)
        with (_session(model, device, dtype, fast_decode, batch_size, workers, location, False) as session,
              out.progress_bar(len(images), quiet) as advance):
            counts = pipeline.index_images(session, images, progress=advance)
        failures.extend(counts.failures)
        for failure in sorted(failures, key=lambda f: f.path):
            eprint(f"{failure.path}: {failure.reason}")
        eprint(f"indexed {len(images)} image(s) in {location}: {counts.new} new, {counts.updated} updated, "
               f"{counts.unchanged} unchanged, {len(failures)} failed")
        if failures:
            raise typer.Exit(EXIT_SOME_FAILED)
        return
    if not location.exists():
        raise UsageError(f"there is no index at {location} yet; `clip index PATH` or any classify/embed run makes it")
    store = Index(location, lambda message: None)  # a problem is this command's error, below
    try:
        if prune:
            pruned = store.prune()
            if pruned is not None:
                eprint(f"pruned {location}: {pruned[0]} file(s) that are gone, {pruned[1]} embedding(s) no file has")
        elif clear:
            if store.clear():
                eprint(f"cleared {location}")
        else:
            summary = store.summary()
            if summary is not None:
                write_stdout(out.render_index_summary(summary))
    finally:
        store.close()
    if store.problem is not None:
        raise UsageError(f"the index {location} {store.problem}; give --index the path of a clipcli index")


@app.command()
@handle_errors
def search(
    query: Annotated[str | None, typer.Argument(
        metavar="QUERY", show_default=False,
        help="Words to search for, embedded as given (no template). With --image, leave it out.")] = None,
    paths: Annotated[list[str] | None, typer.Argument(
        metavar="[PATH]...", show_default=False,
        help="Image files and/or folders to search (walked recursively) [default: .]")] = None,
    image: Annotated[Path | None, typer.Option(
        "--image", show_default=False, help="Search by this example image instead of words.")] = None,
    add: Annotated[list[str] | None, typer.Option(
        "--add", show_default=False, help="Words to add to the query (repeatable): beach --add sunset.")] = None,
    subtract: Annotated[list[str] | None, typer.Option(
        "--subtract", show_default=False, help="Words to steer away from (repeatable): --subtract people.")] = None,
    add_image: Annotated[list[Path] | None, typer.Option(
        "--add-image", show_default=False, help="An image to add to the query (repeatable).")] = None,
    subtract_image: Annotated[list[Path] | None, typer.Option(
        "--subtract-image", show_default=False, help="An image to steer away from (repeatable).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Images shown, best first.")] = 10,
    fmt: Annotated[Format, typer.Option(
        "--format", "-f", help="table for people; csv, json or jsonl for programs.")] = Format.table,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write results here (default stdout; - is stdout too).")] = None,
    model: ModelOpt = DEFAULT_MODEL,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    workers: WorkersOpt = None,
    fast_decode: FastOpt = False,
    index: IndexOpt = None,
    no_index: NoIndexOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Find images by words or by an example image: the most similar first (cosine of CLIP embeddings).

    Images not in the embedding index yet are embedded first (and kept), so the next search is quick.

    Examples:

      clip search "a dog on a sofa" photos/

      clip search beach --add sunset --subtract people photos/ -k 20

      clip search --image cat.jpg photos/ -f jsonl
    """
    import os

    from clipcli import output as out
    from clipcli import search as searching
    from clipcli.inputs import find_images

    if image is not None and query is not None:
        if not os.path.lexists(query):
            raise UsageError(f"with --image every argument is a PATH, and '{query}' does not exist; add words to "
                             f"an image query with --add '{query}'")
        paths = [query, *(paths or [])]
        query = None
    if query is None and image is None:
        raise UsageError("nothing to search for; give a QUERY (words) or --image FILE")
    texts = [*([query] if query is not None else []), *(add or [])]
    for item in [*texts, *(subtract or [])]:
        _check_utf8("query", item)
    request = searching.Query(tuple(texts), tuple(str(p) for p in [*([image] if image else []), *(add_image or [])]),
                              tuple(subtract or []), tuple(str(p) for p in subtract_image or []))
    output = _checked_output(output)
    images, failures = find_images(paths or ["."])
    _warn_if_no_images(images, failures)
    if output is not None:
        out.check_not_an_input([output], images)
    with _session(model, device, dtype, fast_decode, batch_size, workers, index, no_index) as session:
        embedded = searching.embed_query(session, request)
        for text in embedded.truncated:
            warn(f"query '{text[:60]}{'…' if len(text) > 60 else ''}' is longer than the model's "
                 f"{session.info.context_length}-token context and was truncated")
        with out.progress_bar(len(images), quiet) as advance:
            found = searching.search(session, images, embedded, top_k, progress=advance)
    failures.extend(found.failures)
    records = out.search_records([(hit.path, hit.score) for hit in found.hits])
    _write(out.render_search(records, fmt.value), output)
    _finish(failures)


@app.command()
@handle_errors
def duplicates(
    paths: PathsArg,
    threshold: Annotated[float, typer.Option(
        "--threshold", min=-1.0, max=1.0,
        help="Cosine similarity at or above which two images are near-duplicates.")] = 0.95,
    fmt: Annotated[Format, typer.Option(
        "--format", "-f", help="table for people; csv, json or jsonl for programs.")] = Format.table,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write results here (default stdout; - is stdout too).")] = None,
    model: ModelOpt = DEFAULT_MODEL,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    workers: WorkersOpt = None,
    fast_decode: FastOpt = False,
    index: IndexOpt = None,
    no_index: NoIndexOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Find groups of near-duplicate images (resized, re-encoded, cropped copies), largest group first.

    Two images are linked when the cosine of their embeddings reaches --threshold; a group is every image
    linked to another member, directly or through others. min_score is the smallest cosine between two members.

    Examples:

      clip duplicates photos/

      clip duplicates photos/ --threshold 0.9 -f json -o groups.json
    """
    from clipcli import output as out
    from clipcli import search as searching
    from clipcli.inputs import find_images

    output = _checked_output(output)
    images, failures = find_images(paths)
    _warn_if_no_images(images, failures)
    if output is not None:
        out.check_not_an_input([output], images)
    with (_session(model, device, dtype, fast_decode, batch_size, workers, index, no_index) as session,
          out.progress_bar(len(images), quiet) as advance):
        found = searching.duplicates(session, images, threshold, progress=advance)
    failures.extend(found.failures)
    _write(out.render_duplicates(out.duplicate_records(found.groups), fmt.value), output)
    if not quiet:
        grouped = sum(len(paths) for paths, _ in found.groups)
        eprint(f"{len(found.groups)} group(s) of near-duplicates ({grouped} images) among {found.compared} "
               f"image(s) at cosine >= {threshold:g}")
    _finish(failures)


def _checked_output(output: Path | None) -> Path | None:
    """-o as a file to write (None: stdout), checked writable before any work."""
    from clipcli import output as out

    if output is None or str(output) == "-":
        return None
    out.check_writable(output)
    return output


def _write(text: str, output: Path | None) -> None:
    from clipcli import output as out

    if output is None:
        write_stdout(text)
    else:
        out.write_text(output, text)



@app.command("convert-weights")
@handle_errors
def convert_weights(
    src: Annotated[str, typer.Argument(help="OpenAI/OpenCLIP checkpoint, or a Hugging Face CLIP directory/file.")],
    dst: Annotated[Path, typer.Argument(help="Directory to write in Hugging Face CLIP layout.")],
    dtype: Annotated[str, typer.Option(help="fp32, fp16 or bf16 for the saved weights.")] = "fp32",
    activation: Annotated[str | None, typer.Option(
        help="hidden_act of both towers: quick_gelu (OpenAI; the default for checkpoint files), gelu (some "
        "OpenCLIP models), or gelu_new, gelu_pytorch_tanh, gelu_fast, relu, silu, swish. Overrides config.json "
        "when SRC is a directory.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty DST.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Convert a checkpoint to a Hugging Face CLIP directory that clip and transformers both load.

    Example:

      clip convert-weights ViT-B-32.pt clip-vit-b-32/ --dtype fp16
    """
    from clipcli.loader import convert

    written = convert(src, dst, dtype=dtype, hidden_act=activation, force=force)
    eprint(f"wrote {written}")


@app.command()
@handle_errors
def info(
    model: Annotated[str, typer.Argument(
        envvar="CLIP_MODEL", help="Directory, checkpoint file or Hub id.")] = DEFAULT_MODEL,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    debug: DebugOpt = False,
) -> None:
    """Describe a model: architecture, parameters, dtype, image size, context length, source."""
    from clipcli.loader import load

    clip = load(model, device=device, dtype=dtype)
    config = clip.config
    params = sum(p.numel() for p in clip.model.parameters())
    vision, text = config.vision, config.text
    lines = [
        ("source", clip.source),
        ("architecture", f"ViT-{vision.patch_size} vision ({vision.num_hidden_layers} layers, width "
                         f"{vision.hidden_size}, {vision.num_attention_heads} heads) + text transformer "
                         f"({text.num_hidden_layers} layers, width {text.hidden_size}, "
                         f"{text.num_attention_heads} heads)"),
        ("parameters", f"{params:,}"),
        ("embedding dim", str(config.projection_dim)),
        ("image size", f"{vision.image_size}x{vision.image_size}"),
        ("context length", str(text.max_position_embeddings)),
        ("vocab size", str(text.vocab_size)),
        ("activation", vision.hidden_act if vision.hidden_act == text.hidden_act
         else f"{vision.hidden_act} (vision), {text.hidden_act} (text)"),
        ("dtype", str(clip.dtype).removeprefix("torch.")),
        ("device", str(clip.device)),
    ]
    for key, value in lines:
        typer.echo(f"{key + ':':<16}{value}")


# ------------------------------------------------------------------------------------------------ helpers


def _read_lines(path: Path, option: str) -> list[str]:
    """The stripped non-blank lines of a UTF-8 text file (a leading byte-order mark dropped); '-' is stdin."""
    try:
        raw = (sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()).decode("utf-8-sig")
    except FileNotFoundError:
        raise UsageError(f"{option} '{path}' does not exist; give a text file, one item per line") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read {option} '{path}': {getattr(err, 'strerror', None) or err}; "
                         "give a UTF-8 text file") from None
    return [line.strip() for line in raw.splitlines() if line.strip()]


def _read_labels(labels: list[str] | None, labels_file: Path | None) -> list[str]:
    from clipcli.pipeline import check_labels

    if labels and labels_file is not None:
        raise UsageError("give --labels or --labels-file, not both")
    if labels_file is not None:
        items = _read_lines(labels_file, "--labels-file")
    else:
        items = [item.strip() for group in labels or [] for item in group.split(",") if item.strip()]
    if not items:
        raise UsageError("no labels; pass --labels cat,dog,car or --labels-file FILE (one label per line)")
    for item in items:
        _check_utf8("label", item)
    check_labels(items)
    return items


def _check_utf8(kind: str, item: str) -> None:
    # Arguments that are not valid UTF-8 reach Python as lone surrogates, which the tokenizer cannot take.
    try:
        item.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{kind} '{item}' is not valid UTF-8; give text in UTF-8") from None


def _templates(template: list[str] | None, templates: str | None) -> list[str]:
    from clipcli.pipeline import DEFAULT_TEMPLATE, check_templates
    from clipcli.templates import TEMPLATE_SETS

    chosen = list(template or [])
    for item in chosen:
        _check_utf8("template", item)
    if templates is not None:
        if templates not in TEMPLATE_SETS:
            raise UsageError(f"unknown --templates '{templates}'; use one of {', '.join(TEMPLATE_SETS)}")
        chosen += TEMPLATE_SETS[templates]
    chosen = chosen or [DEFAULT_TEMPLATE]
    check_templates(chosen)  # before the model loads, not after
    return chosen


def _warn_if_no_images(images: list[str], failures: list) -> None:
    if not images and not failures:
        from clipcli.inputs import IMAGE_EXTENSIONS

        warn("no images found; images are recognised by extension ("
             + " ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS)) + ")")


def _finish(failures: list[Failure]) -> None:
    for failure in sorted(failures, key=lambda f: f.path):  # walk and decode failures, in one path order
        eprint(f"{failure.path}: {failure.reason}")
    if failures:
        eprint(f"{len(failures)} input(s) failed; the others were processed")
        raise typer.Exit(EXIT_SOME_FAILED)


def main() -> None:
    """Console entry point."""
    install_signal_handlers()
    app(prog_name="clip")


if __name__ == "__main__":
    main()
