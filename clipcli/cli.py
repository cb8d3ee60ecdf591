"""The `clip` command: each command parses its options, calls the pipeline, renders with output.py and chooses the
exit code. Process plumbing (signals, exit codes, one-line errors, stdout) lives in process.py. Heavy modules are
imported inside commands, so `clip --help` is fast and a run answered from the index imports no torch."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Annotated

import typer

from clipcli.config import ACTIVATIONS  # light: imports nothing heavy
from clipcli.errors import UsageError
from clipcli.process import (
    EXIT_SOME_FAILED,
    ClipCommand,
    OneLineErrors,
    eprint,
    guard_standard_streams,
    handle_errors,
    ignore_signals,
    install_signal_handlers,
    note_kept,
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
    "  clip classify photos/ -l cat,dog -o results.csv\n\n"
    "  clip embed photos/ -o emb.npy\n\n"
    "  clip organize photos/ --labels cat,dog --into sorted/\n\n"
    "  clip convert-weights ViT-B-32.pt converted/",
    rich_markup_mode=None,  # plain-text usage errors ending in one "Error: ..." line
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion
    context_settings={"help_option_names": ["-h", "--help"]},
)
command = app.command  # each command below passes cls=ClipCommand: help shows choices, not Python types


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
    "--model", "-m", envvar="CLIP_MODEL", metavar="MODEL",
    help="Hugging Face CLIP directory, OpenAI-format .pt checkpoint, Hub id, or one of ViT-B-32, ViT-B-16, ViT-L-14, "
    "ViT-L-14-336 (`clip models` lists what is cached).")]
DEVICES = ("auto", "cpu", "cuda", "mps")
DeviceOpt = Annotated[str, typer.Option(
    metavar="[auto|cpu|cuda|mps]", autocompletion=lambda: list(DEVICES),
    help="auto: cuda, then mps, then cpu (cuda:N picks a GPU).")]


class Dtype(str, Enum):
    """--dtype values (pipeline.DTYPES)."""

    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


DtypeOpt = Annotated[Dtype, typer.Option(
    metavar="[auto|fp32|fp16|bf16]",
    help="auto: fp32 on CPU (identical to the reference), fp16 on CUDA.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, metavar="N", help="Images per model call.")]
WorkersOpt = Annotated[int | None, typer.Option(
    "--workers", min=1, metavar="N", help="Image decoding threads (default: one per CPU core).")]
FastOpt = Annotated[bool, typer.Option(
    "--fast-decode", help="Decode large JPEGs at reduced scale before the exact resize (faster, near-identical).")]
IndexOpt = Annotated[Path | None, typer.Option(
    "--index", envvar="CLIP_INDEX", show_default=False, metavar="FILE",
    help="The embedding index file [default: $XDG_CACHE_HOME/clipcli/index.db].")]
NoIndexOpt = Annotated[bool, typer.Option("--no-index", help="Neither read nor write the embedding index.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]
PathsArg = Annotated[list[str] | None, typer.Argument(
    metavar="PATH...", show_default=False,
    help="Image files and/or folders (walked recursively). May be omitted with --files-from.")]
FilesFromOpt = Annotated[str | None, typer.Option(
    "--files-from", metavar="FILE",
    help="Also read image paths from FILE, one per line or NUL-separated (find -print0); - reads stdin.")]
ExcludeOpt = Annotated[list[str] | None, typer.Option(
    "--exclude", metavar="GLOB",
    help="Skip files and folders whose name, path under PATH, or path as shown matches GLOB (repeatable; "
    "'raw/' matches folders only): --exclude '*.tmp' --exclude 'thumbs/'.")]


class Engine(str, Enum):
    """--engine values: local (pipeline.Session, this process) or ray (clipcli.engines)."""

    local = "local"
    ray = "ray"


EngineOpt = Annotated[Engine, typer.Option(
    "--engine", metavar="[local|ray]",
    help="local: this process. ray: decode and run the model on a Ray cluster (--address; needs clipcli[ray]); "
    "every image is computed there and the embedding index is neither read nor written.")]
AddressOpt = Annotated[str | None, typer.Option(
    "--address", envvar="RAY_ADDRESS", metavar="ADDR", show_default=False,
    help="With --engine ray: the Ray cluster to join (head-node:6379, or auto on a node of it) [default: a local "
    "Ray started for the run].")]
MaxPixelsOpt = Annotated[str | None, typer.Option(
    "--max-megapixels", metavar="N|none",
    help="Pillow's decompression-bomb limit: larger images are refused [default: about 89]. Raise it, or none, "
    "for trusted inputs such as panoramas.")]


class Format(str, Enum):
    """--format values (output.FORMATS); an Enum so that Typer rejects others as a usage error and lists them."""

    table = "table"
    csv = "csv"
    json = "json"
    jsonl = "jsonl"


class Score(str, Enum):
    """--score values (scoring.SCORE_KINDS)."""

    prob = "prob"
    cosine = "cosine"


TemplatesOpt = Annotated[str | None, typer.Option(
    metavar="[imagenet]", autocompletion=lambda: ["imagenet"],
    help="A named template set: imagenet (the CLIP paper's 80).")]
ScoreOpt = Annotated[Score, typer.Option(
    "--score", metavar="[prob|cosine]",
    help="prob: probabilities over the labels (softmax; they sum to 1); cosine: each label's cosine similarity on "
    "its own (for one label, or 'none of these').")]
MinScoreOpt = Annotated[float | None, typer.Option(
    "--min-score", show_default=False, metavar="X",
    help="Images whose top score is below this get no label (a probability 0-1, or a cosine with --score cosine).")]


@contextmanager
def _session(model: str, device: str, dtype: Dtype | str, fast_decode: bool, batch_size: int, workers: int | None,
             index: Path | None, no_index: bool, engine: Engine = Engine.local,
             address: str | None = None, index_is_the_work: bool = False) -> Iterator[Session]:
    """The run's Session, its index open for the run (none with --no-index); with --engine ray, a RaySession (no
    index) whose cluster is left when the run ends. `index_is_the_work`: a problem with the index is the command's
    error (Session.index_problem), not a warning that the run goes on without it."""
    from clipcli.index import default_location, open_index
    from clipcli.pipeline import Session, Settings
    from clipcli.process import keep_freed_memory

    keep_freed_memory()  # process-wide malloc setting: this program's to choose, measured in benchmarks/README.md
    settings = Settings(model=model, device=device, dtype=getattr(dtype, "value", dtype), fast_decode=fast_decode,
                        batch_size=batch_size, workers=workers)
    if engine == Engine.ray:
        with _ray_engine().RaySession(settings, address) as ray_session:
            yield ray_session
        return
    store = open_index(None if no_index else (index or default_location()), warn, not index_is_the_work)
    try:
        yield Session(settings, store)
    finally:
        if store is not None:
            store.close()


# ------------------------------------------------------------------------------------------------ commands


@command(cls=ClipCommand)
@handle_errors
def classify(
    paths: PathsArg = None,
    labels: Annotated[list[str] | None, typer.Option(
        "--labels", "-l", metavar="LABELS", help="Comma-separated labels: cat,dog,car (repeatable: -l cat -l dog).")
    ] = None,
    labels_file: Annotated[Path | None, typer.Option(
        metavar="FILE", help="File with one label per line (- reads stdin).")] = None,
    template: Annotated[list[str] | None, typer.Option(
        "--template", "-t", metavar="TEMPLATE",
        help="Prompt template, {} is the label; repeat to ensemble. [default: a photo of a {}.]")] = None,
    templates: TemplatesOpt = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, metavar="N", help="Labels shown per image.")] = 5,
    fmt: Annotated[Format | None, typer.Option(
        "--format", "-f", metavar="[table|csv|json|jsonl]", show_default=False,
        help="table for people; csv, json or jsonl for programs. [default: from -o's extension (.csv, .json, "
        ".jsonl; .html is the report), else table]")] = None,
    output: Annotated[str | None, typer.Option(
        "--output", "-o", metavar="FILE",
        help="Write results here, complete or not at all (default stdout; - is stdout too).")] = None,
    files_from: FilesFromOpt = None,
    exclude: ExcludeOpt = None,
    max_megapixels: MaxPixelsOpt = None,
    score: ScoreOpt = Score.prob,
    min_score: MinScoreOpt = None,
    model: ModelOpt = DEFAULT_MODEL,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = Dtype.auto,
    workers: WorkersOpt = None,
    fast_decode: FastOpt = False,
    index: IndexOpt = None,
    no_index: NoIndexOpt = False,
    engine: EngineOpt = Engine.local,
    address: AddressOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Score images against labels: which words fit which images.

    Examples:

      clip classify photos/ --labels cat,dog,car

      clip classify photos/ -l cat,dog -o results.jsonl      (the extension picks the format)

      find . -name '*.png' | clip classify --files-from - -l cat,dog -f jsonl | head

      clip classify photos/ -l "a cat" --score cosine --min-score 0.25
    """
    import contextlib

    import numpy as np

    from clipcli import output as out
    from clipcli import pipeline
    from clipcli.inputs import PathOrder

    _one_stdin_reader(("--labels-file", labels_file), ("--files-from", files_from))  # before either reads
    label_list = _read_labels(labels, labels_file)
    target, chosen = _rows_output(output, fmt, "classify", html=True)
    out.check_labels_for(chosen, label_list)
    prompt_templates = _templates(template, templates)
    pipeline.check_score(score.value, min_score)
    if engine == Engine.ray:
        _ray_engine()  # installed, before any work
    images, failures = _find_inputs(paths, files_from, exclude, max_megapixels)
    if target is not None:
        out.check_not_an_input([Path(target)], images)
    with _session(model, device, dtype, fast_decode, batch_size, workers, index, no_index, engine,
                  address) as session:
        label_set = pipeline.label_embeddings(session, label_list, prompt_templates)
        for label in label_set.truncated:
            warn(f"label '{label}' is longer than the model's {session.info.context_length}-token context and "
                 "was truncated")
        order: PathOrder[dict | out.JsonLine] = PathOrder(failures)  # the walk's failures, put between rows by path
        # Rows go out batch by batch; the HTML report (report.py) needs them all, so for it they are kept.
        rows = None if chosen == "html" else out.RowWriter(target, chosen, out.classify_layout(label_list, score.value))
        found: list[str] = []
        kept: list[np.ndarray] = []
        with rows or contextlib.nullcontext(), out.progress_bar(len(images), quiet) as advance:
            for batch in pipeline.classify(session, images, label_set, progress=advance, score=score.value):
                failures.extend(batch.failures)
                if rows is None:
                    found.extend(batch.paths)
                    kept.append(batch.scores)
                    continue
                encode = out.classify_jsonl if chosen == "jsonl" else out.classify_records
                records = encode(batch.paths, batch.scores, label_list, top_k, min_score)
                rows.write(_records(order.batch(zip(batch.paths, records, strict=True), batch.failures)))
            if rows is not None:
                rows.write(_records(order.rest()))
    _warn_if_one_label(label_list, score.value)
    if rows is None and target is not None:
        from clipcli import report

        scores = np.concatenate(kept) if kept else np.zeros((0, len(label_list)), dtype=np.float32)
        with out.progress_bar(len(found), quiet) as advance:
            report.write_classify_report(Path(target), found, scores, label_list, top_k=top_k, threshold=min_score,
                                         score=score.value, model=model, templates=prompt_templates,
                                         failures=failures, workers=workers, progress=advance)
    _finish(failures)


@command(cls=ClipCommand)
@handle_errors
def embed(
    paths: PathsArg = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", metavar="FILE", show_default=False,
        help="Required. NAME.npy (with NAME.paths.txt and NAME.meta.json beside it) or NAME.parquet (needs "
        "clipcli[parquet]).")] = None,
    text: Annotated[list[str] | None, typer.Option(
        "--text", metavar="TEXT", help="Embed this text instead of images (repeatable).")] = None,
    text_file: Annotated[Path | None, typer.Option(
        metavar="FILE", help="Embed each line of this file (blank lines skipped; - reads stdin).")] = None,
    no_normalize: Annotated[bool, typer.Option(
        "--no-normalize", help="Raw projected features, not L2-normalised.")] = False,
    files_from: FilesFromOpt = None,
    exclude: ExcludeOpt = None,
    max_megapixels: MaxPixelsOpt = None,
    model: ModelOpt = DEFAULT_MODEL,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = Dtype.auto,
    workers: WorkersOpt = None,
    fast_decode: FastOpt = False,
    index: IndexOpt = None,
    no_index: NoIndexOpt = False,
    engine: EngineOpt = Engine.local,
    address: AddressOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write embeddings, float32 (N, D): a .npy with a .paths.txt (line i names row i) and .meta.json (the model)
    beside it, or a .parquet file (path and embedding columns, the model in its schema metadata).

    Examples:

      clip embed photos/ -o emb.npy

      clip embed photos/ -o emb.parquet

      clip embed --text "a cat" --text "a dog" -o text.npy
    """
    from clipcli import embedfile, pipeline
    from clipcli import output as out
    from clipcli.resolve import canonical_name

    if output is None:
        raise UsageError("missing -o/--output: embeddings are written only to a file you name; pass -o emb.npy "
                         "or -o emb.parquet")
    if str(output) == "-":
        raise UsageError("clip embed writes files (a .npy with files beside it, or a .parquet), not stdout; give "
                         "a file name with -o")
    images_given = bool(paths) or files_from is not None
    if (text or text_file) and images_given:
        raise UsageError("give image PATHs (or --files-from) or --text/--text-file, not both")
    if not (text or text_file) and not images_given:
        raise UsageError("nothing to embed; pass image files/folders, --files-from FILE, or --text TEXT")
    texts = list(text or []) + (_read_lines(text_file, "--text-file", strip=False) if text_file else [])
    for item in texts:
        _check_utf8("--text", item)
    if (text or text_file) and not texts:
        raise UsageError(f"{text_file} has no text lines; put one text per line")
    files = embedfile.output_files(output)  # a known extension, and pyarrow for .parquet, before any work
    for path in files:  # an embeddings file and the files beside it need real files
        out.check_writable(path, stream_ok=False)
    if engine == Engine.ray:
        _ray_engine()  # installed, before any work
    failures: list[Failure] = []
    images: list[str] = []
    if not texts:
        images, failures = _find_inputs(paths, files_from, exclude, max_megapixels)
        out.check_not_an_input(files, images)
    # Texts are encoded here whatever the engine: a cluster would only add its start-up.
    with _session(model, device, dtype, fast_decode, batch_size, workers, index, no_index,
                  Engine.local if texts else engine, address) as session:
        meta = embedfile.EmbeddingMeta(
            model=model, model_id=canonical_name(model), fingerprint=session.model_fingerprint(),
            precision="fp32" if texts else session.precision,  # texts are always encoded in float32
            normalized=not no_normalize, content="texts" if texts else "images")
        writer = embedfile.open_embeddings(output, meta)
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
            written = writer.close(session.info.projection_dim)
        except BaseException:
            writer.abort()
            raise
    if not quiet:
        eprint(written.summary())
    _finish(failures)


@command("index", cls=ClipCommand)
@handle_errors
def index_command(
    paths: Annotated[list[str] | None, typer.Argument(
        metavar="PATH...", help="Image files and/or folders to add or update.", show_default=False)] = None,
    info: Annotated[bool, typer.Option(
        "--info", help="Show what the index holds (the default without PATH; after the work with PATH, --prune or "
        "--clear).")] = False,
    prune: Annotated[bool, typer.Option("--prune", help="Forget files that are gone, and their embeddings.")] = False,
    clear: Annotated[bool, typer.Option("--clear", help="Remove every entry.")] = False,
    files_from: FilesFromOpt = None,
    exclude: ExcludeOpt = None,
    max_megapixels: MaxPixelsOpt = None,
    model: ModelOpt = DEFAULT_MODEL,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = Dtype.auto,
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
    from clipcli.index import Index, default_location, unusable

    adding = bool(paths) or files_from is not None
    if sum((adding, prune, clear)) > 1:
        raise UsageError("give PATHs to index, --prune or --clear, one at a time")
    location = index or default_location()
    if adding:
        images, failures = _find_inputs(paths, files_from, exclude, max_megapixels)
        note_kept("the images indexed so far are kept; run it again to finish")
        with (_session(model, device, dtype, fast_decode, batch_size, workers, location, False,
                       index_is_the_work=True) as session,
              out.progress_bar(len(images), quiet) as advance):
            counts = pipeline.index_images(session, images, progress=advance)
        failures.extend(counts.failures)
        _print_failures(failures)
        indexed = counts.new + counts.updated + counts.unchanged
        eprint(f"indexed {indexed} image(s) in {location}: {counts.new} new, {counts.updated} updated, "
               f"{counts.unchanged} unchanged, {len(failures)} failed; the model ran on {session.computed_images}")
        if info:
            _show_index(location)
        if failures:
            raise typer.Exit(EXIT_SOME_FAILED)
        return
    if not location.exists():
        raise UsageError(f"there is no index at {location} yet; `clip index PATH` or any classify/embed run makes it")
    if prune or clear:
        store = Index(location, warn, warn_on_problem=False)  # a problem is this command's error, below
        try:
            if prune:
                pruned = store.prune()
                if pruned is not None:
                    eprint(f"pruned {location}: {pruned[0]} file(s) that are gone, {pruned[1]} embedding(s) no file "
                           "has")
            elif store.clear():
                eprint(f"cleared {location}")
        finally:
            store.close()
        if store.problem is not None:
            raise UsageError(unusable(location, store.problem))
    if info or not (prune or clear):
        _show_index(location)


def _show_index(location: Path) -> None:
    """Write what the index at `location` holds to stdout; UsageError when it is not a usable index."""
    from clipcli import output as out
    from clipcli.index import Index, unusable

    store = Index(location, warn, warn_on_problem=False)  # a problem is this command's error, below
    try:
        summary = store.summary()
    finally:
        store.close()
    if summary is None:
        raise UsageError(unusable(location, store.problem))
    write_stdout(out.render_index_summary(summary))


@command(cls=ClipCommand)
@handle_errors
def organize(
    paths: Annotated[list[str] | None, typer.Argument(
        metavar="PATH", help="Image files and/or folders to sort (walked recursively).", show_default=False)] = None,
    into: Annotated[Path | None, typer.Option(
        "--into", metavar="DEST", show_default=False,
        help="The folder to sort into: one folder per label inside it (created if missing).")] = None,
    labels: Annotated[list[str] | None, typer.Option(
        "--labels", "-l", help="Comma-separated labels: cat,dog,car (repeatable).")] = None,
    labels_file: Annotated[Path | None, typer.Option(help="File with one label per line (- reads stdin).")] = None,
    copy: Annotated[bool, typer.Option("--copy", help="Copy each image into its folder (the default).")] = False,
    move: Annotated[bool, typer.Option("--move", help="Move each image (never lost, even if interrupted).")] = False,
    link: Annotated[bool, typer.Option("--link", help="Hard-link each image (same file system only).")] = False,
    symlink: Annotated[bool, typer.Option("--symlink", help="Put a symbolic link to each image.")] = False,
    min_score: MinScoreOpt = None,
    score: ScoreOpt = Score.prob,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the plan (source -> destination, label, score) and touch nothing.")] = False,
    undo: Annotated[Path | None, typer.Option(
        "--undo", metavar="DEST", show_default=False,
        help="Undo what the log DEST/clip-organize.jsonl records: move images back, remove copies and links.")] = None,
    template: Annotated[list[str] | None, typer.Option(
        "--template", "-t",
        help="Prompt template, {} is the label; repeat to ensemble. [default: a photo of a {}.]")] = None,
    templates: TemplatesOpt = None,
    files_from: FilesFromOpt = None,
    exclude: ExcludeOpt = None,
    max_megapixels: MaxPixelsOpt = None,
    model: ModelOpt = DEFAULT_MODEL,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = Dtype.auto,
    workers: WorkersOpt = None,
    fast_decode: FastOpt = False,
    index: IndexOpt = None,
    no_index: NoIndexOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Sort images into one folder per label: DEST/<top label>/, never overwriting or losing a file.

    Every action is logged in DEST/clip-organize.jsonl; running the same command again finishes an interrupted run
    and repeats nothing.

    Examples:

      clip organize photos/ --labels cat,dog,car --into sorted/ --dry-run

      clip organize photos/ -l cat,dog --into sorted/ --move --min-score 0.8

      clip organize --undo sorted/
    """
    from clipcli import organize as org
    from clipcli import output as out
    from clipcli import pipeline
    from clipcli.process import Terminated, stopped_by

    if undo is not None:
        if paths or files_from is not None or into is not None or labels or labels_file is not None or dry_run:
            raise UsageError("--undo DEST takes no PATHs, labels, --into or --dry-run; run `clip organize --undo "
                             "DEST` alone")
        result = org.undo(undo)
        if not quiet:
            done = ", ".join(f"{count} {what}" for what, count in sorted(result.undone.items())) or "nothing to undo"
            eprint(f"undid {sum(result.undone.values())} action(s) logged in {undo}: {done}")
        _finish(result.failures)
        return
    if into is None:
        raise UsageError("no destination; pass --into DEST, the folder to sort the images into")
    if not paths and files_from is None:
        raise UsageError("nothing to organize; pass image files or folders, or --files-from FILE (- reads stdin)")
    modes = [name for name, chosen in (("copy", copy), ("move", move), ("link", link), ("symlink", symlink))
             if chosen]
    if len(modes) > 1:
        chosen = " and ".join(f"--{mode}" for mode in modes)
        raise UsageError(f"give one of --copy, --move, --link or --symlink, not {chosen}")
    _one_stdin_reader(("--labels-file", labels_file), ("--files-from", files_from))  # before either reads
    label_list = _read_labels(labels, labels_file)
    prompt_templates = _templates(template, templates)
    pipeline.check_score(score.value, min_score)
    organizer = org.Organizer(into, label_list, modes[0] if modes else "copy", min_score=min_score, dry_run=dry_run)
    organizer.check_paths(paths or [])
    images, failures = _gather_inputs(paths, files_from, exclude, max_megapixels, skip=[str(into)])
    images = organizer.outside(images)  # DEST's files are never input, however they were reached
    failures = [f for f in failures if organizer.outside([f.path])]
    _warn_if_no_images(images, failures)
    with _session(model, device, dtype, fast_decode, batch_size, workers, index, no_index) as session:
        label_set = pipeline.label_embeddings(session, label_list, prompt_templates)
        for label in label_set.truncated:
            warn(f"label '{label}' is longer than the model's {session.info.context_length}-token context and "
                 "was truncated")
        try:
            with organizer, out.progress_bar(len(images), quiet) as advance:
                for batch in pipeline.classify(session, images, label_set, progress=advance, score=score.value):
                    failures.extend(batch.failures)
                    failures.extend(organizer.place(batch.paths, batch.scores))
        except (KeyboardInterrupt, Terminated) as stop:
            what = ("; nothing was changed (--dry-run) and no plan was printed" if dry_run else
                    f" after {len(organizer.steps)} of {len(images)} image(s); {organizer.log.path} records what was "
                    "done; run the same command again to finish")
            raise stopped_by(stop, what) from None
    _warn_if_one_label(label_list, score.value)
    if dry_run:
        write_stdout(out.render_plan(organizer.steps, score.value))
    if not quiet:
        eprint(organizer.summary())
    _finish(failures)


@command("eval", cls=ClipCommand)
@handle_errors
def eval_command(
    dataset: Annotated[str, typer.Argument(
        metavar="DATASET", help="A folder with one subfolder of images per class (the folder name is the label).",
        show_default=False)],
    class_names: Annotated[Path | None, typer.Option(
        "--class-names", help="File of 'folder<TAB>label' lines giving classes their label text (- reads stdin).",
        show_default=False)] = None,
    template: Annotated[list[str] | None, typer.Option(
        "--template", "-t",
        help="Prompt template, {} is the label; repeat to ensemble. [default: a photo of a {}.]")] = None,
    templates: TemplatesOpt = None,
    exclude: ExcludeOpt = None,
    max_megapixels: MaxPixelsOpt = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Labels shown per image in an HTML report.")] = 5,
    fmt: Annotated[Format | None, typer.Option(
        "--format", "-f", metavar="[table|csv|json|jsonl]", show_default=False,
        help="table for people; csv, json or jsonl (the json object on one line) for programs. [default: from -o's "
        "extension (.csv, .json, .jsonl; .html is the report), else table]")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write results here (default stdout); NAME.html writes a report to open in a browser.")
    ] = None,
    model: ModelOpt = DEFAULT_MODEL,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = Dtype.auto,
    workers: WorkersOpt = None,
    fast_decode: FastOpt = False,
    index: IndexOpt = None,
    no_index: NoIndexOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Measure zero-shot accuracy on a labelled folder: acc1, acc5, mean per-class recall, confusion matrix.

    Examples:

      clip eval sorted-photos/

      clip eval sorted-photos/ --templates imagenet -f json

      clip eval sorted-photos/ --class-names names.tsv -o eval.html
    """
    from clipcli import evaluate
    from clipcli import output as out

    prompt_templates = _templates(template, templates)
    target, chosen = _rows_output(None if output is None else str(output), fmt, "eval", html=True)
    output = None if target is None else Path(target)
    names = evaluate.parse_class_names(_read_lines(class_names, "--class-names")) if class_names else None
    from clipcli.inputs import Exclude

    _size_limit(max_megapixels)
    data = evaluate.find_dataset(dataset, names, Exclude(tuple(exclude or ())))
    if data.stray:
        warn(f"{len(data.stray)} image(s) directly in '{dataset}' belong to no class folder and were left out")
    if data.unused_names:
        warn(f"--class-names names {len(data.unused_names)} folder(s) that are not class folders of '{dataset}' "
             f"(e.g. '{out.display_line(data.unused_names[0])}'); their lines were not used")
    _warn_if_no_images(data.paths, data.failures)
    if output is not None:
        out.check_not_an_input([output], data.paths)
    with (_session(model, device, dtype, fast_decode, batch_size, workers, index, no_index) as session,
          out.progress_bar(len(data.paths), quiet) as advance):
        result = evaluate.evaluate(session, data, prompt_templates, progress=advance)
        context = session.info.context_length if result.truncated else 0
    for label in result.truncated:
        warn(f"label '{label}' is longer than the model's {context}-token context and was truncated")
    if chosen == "html":
        from clipcli import report

        assert output is not None

        with out.progress_bar(len(result.paths), quiet) as advance:
            report.write_eval_report(output, result, top_k=top_k, model=model, templates=prompt_templates,
                                     workers=workers, progress=advance)
    else:
        summary = {**result.metrics.to_json(),
                   "errors": [{"path": out.display_path(f.path), "error": f.reason} for f in result.failures]}
        terminal = output is None and sys.stdout.isatty()
        text = out.render_eval(summary, chosen, shutil.get_terminal_size().columns if terminal else None)
        if output is None:
            write_stdout(text)
        else:
            out.write_text(output, text)
    _finish(result.failures)


FormatOpt = Annotated[Format | None, typer.Option(
    "--format", "-f", metavar="[table|csv|json|jsonl]", show_default=False,
    help="table for people; csv, json or jsonl for programs. [default: from -o's extension (.csv, .json, .jsonl), "
    "else table]")]
OutputOpt = Annotated[str | None, typer.Option(
    "--output", "-o", metavar="FILE",
    help="Write results here, complete or not at all (default stdout; - is stdout too).")]


@command(cls=ClipCommand)
@handle_errors
def search(
    query: Annotated[str | None, typer.Argument(
        metavar="QUERY", show_default=False,
        help="Words to search for, embedded as given (no template). With --image, leave it out.")] = None,
    paths: Annotated[list[str] | None, typer.Argument(
        metavar="[PATH]...", show_default=False,
        help="Image files and/or folders to search (walked recursively) [default: ., unless --files-from]")] = None,
    image: Annotated[Path | None, typer.Option(
        "--image", metavar="FILE", show_default=False, help="Search by this example image instead of words.")] = None,
    add: Annotated[list[str] | None, typer.Option(
        "--add", metavar="TEXT", show_default=False,
        help="Words to add to the query (repeatable): beach --add sunset.")] = None,
    subtract: Annotated[list[str] | None, typer.Option(
        "--subtract", metavar="TEXT", show_default=False,
        help="Words to steer away from (repeatable): --subtract people.")] = None,
    add_image: Annotated[list[Path] | None, typer.Option(
        "--add-image", metavar="FILE", show_default=False, help="An image to add to the query (repeatable).")] = None,
    subtract_image: Annotated[list[Path] | None, typer.Option(
        "--subtract-image", metavar="FILE", show_default=False,
        help="An image to steer away from (repeatable).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, metavar="N", help="Images shown, best first.")] = 10,
    fmt: FormatOpt = None,
    output: OutputOpt = None,
    files_from: FilesFromOpt = None,
    exclude: ExcludeOpt = None,
    max_megapixels: MaxPixelsOpt = None,
    model: ModelOpt = DEFAULT_MODEL,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = Dtype.auto,
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
    from clipcli import output as out
    from clipcli import search as searching

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
    target, chosen = _rows_output(output, fmt, "search")
    images, failures = _find_inputs(paths or ([] if files_from is not None else ["."]), files_from, exclude,
                                    max_megapixels)
    if target is not None:
        out.check_not_an_input([Path(target)], images)
    with _session(model, device, dtype, fast_decode, batch_size, workers, index, no_index) as session:
        embedded = searching.embed_query(session, request)
        for text in embedded.truncated:
            warn(f"query '{text[:60]}{'…' if len(text) > 60 else ''}' is longer than the model's "
                 f"{session.info.context_length}-token context and was truncated")
        with out.progress_bar(len(images), quiet) as advance:
            found = searching.search(session, images, embedded, top_k, progress=advance)
    failures.extend(found.failures)
    with out.RowWriter(target, chosen, out.search_layout()) as rows:  # best first, then the failures by path
        rows.write([*out.search_records([(hit.path, hit.score) for hit in found.hits]),
                    *(out.failure_record(f.path, f.reason) for f in sorted(failures, key=lambda f: f.path))])
    _finish(failures)


@command(cls=ClipCommand)
@handle_errors
def duplicates(
    paths: PathsArg = None,
    threshold: Annotated[float, typer.Option(
        "--threshold", min=-1.0, max=1.0, metavar="X",
        help="Cosine similarity at or above which two images are near-duplicates.")] = 0.95,
    fmt: FormatOpt = None,
    output: OutputOpt = None,
    files_from: FilesFromOpt = None,
    exclude: ExcludeOpt = None,
    max_megapixels: MaxPixelsOpt = None,
    model: ModelOpt = DEFAULT_MODEL,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = Dtype.auto,
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

      clip duplicates photos/ --threshold 0.9 -o groups.json
    """
    from clipcli import output as out
    from clipcli import search as searching

    target, chosen = _rows_output(output, fmt, "duplicates")
    images, failures = _find_inputs(paths, files_from, exclude, max_megapixels)
    if target is not None:
        out.check_not_an_input([Path(target)], images)
    with (_session(model, device, dtype, fast_decode, batch_size, workers, index, no_index) as session,
          out.progress_bar(len(images), quiet) as advance):
        found = searching.duplicates(session, images, threshold, progress=advance)
    failures.extend(found.failures)
    with out.RowWriter(target, chosen, out.duplicates_layout()) as rows:
        rows.write(out.duplicate_records(found.groups))
    if not quiet:
        grouped = sum(len(group) for group, _ in found.groups)
        eprint(f"{len(found.groups)} group(s) of near-duplicates ({grouped} images) among {found.compared} "
               f"image(s) at cosine >= {threshold:g}")
    _finish(failures)


def _rows_output(output: str | None, fmt: Format | None, name: str, html: bool = False) -> tuple[str | None, str]:
    """-o as a file to write (None: stdout), checked writable before any work, and the format to write; "html"
    (a report) only for a command that writes one."""
    from clipcli import output as out

    chosen = out.choose_format(output, fmt.value if fmt is not None else None)
    if chosen == "html" and not html:
        raise UsageError(f"clip {name} writes no HTML report; use -o NAME.json, .jsonl or .csv, or a table file")
    target = None if output is None or output == "-" else output
    if target is not None:
        out.check_writable(Path(target))
    return target, chosen


class ConvertDtype(str, Enum):
    """convert-weights --dtype values."""

    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


@command("convert-weights", cls=ClipCommand)
@handle_errors
def convert_weights(
    src: Annotated[str, typer.Argument(
        metavar="SRC", help="OpenAI/OpenCLIP checkpoint, or a Hugging Face CLIP directory/file.")],
    dst: Annotated[Path, typer.Argument(metavar="DST", help="Directory to write in Hugging Face CLIP layout.")],
    dtype: Annotated[ConvertDtype, typer.Option(
        metavar="[fp32|fp16|bf16]", help="Precision of the saved weights.")] = ConvertDtype.fp32,
    activation: Annotated[str | None, typer.Option(
        metavar="NAME", autocompletion=lambda: list(ACTIVATIONS),
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

    written = convert(src, dst, dtype=dtype.value, hidden_act=activation, force=force)
    eprint(f"wrote {written}")


@command(cls=ClipCommand)
@handle_errors
def info(
    model: Annotated[str, typer.Argument(
        envvar="CLIP_MODEL", metavar="MODEL", help="Directory, checkpoint file, Hub id or alias (ViT-B-32, ...).")
    ] = DEFAULT_MODEL,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = Dtype.auto,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object instead of lines for people.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Describe a model: architecture, parameters, stored and compute dtype, image size, context length, source.

    Examples:

      clip info ViT-B-32

      clip info converted/ --json
    """
    import json

    from clipcli.loader import load
    from clipcli.resolve import canonical_name

    clip = load(model, device=device, dtype=dtype.value)
    config = clip.config
    vision, text = config.vision, config.text
    facts = {
        "model": canonical_name(model),
        "source": clip.source,
        "architecture": f"ViT-{vision.patch_size} vision ({vision.num_hidden_layers} layers, width "
                        f"{vision.hidden_size}, {vision.num_attention_heads} heads) + text transformer "
                        f"({text.num_hidden_layers} layers, width {text.hidden_size}, {text.num_attention_heads} "
                        "heads)",
        "parameters": sum(p.numel() for p in clip.model.parameters()),
        "embedding_dim": config.projection_dim,
        "image_size": vision.image_size,
        "context_length": text.max_position_embeddings,
        "vocab_size": text.vocab_size,
        "activation": vision.hidden_act if vision.hidden_act == text.hidden_act
        else f"{vision.hidden_act} (vision), {text.hidden_act} (text)",
        "dtype": clip.weights_dtype,
        "compute_dtype": str(clip.dtype).removeprefix("torch."),
        "device": str(clip.device),
    }
    if as_json:
        write_stdout(json.dumps(facts, ensure_ascii=False) + "\n")
        return
    shown = {**facts, "parameters": f"{facts['parameters']:,}",
             "image_size": f"{vision.image_size}x{vision.image_size}"}
    names = {"embedding_dim": "embedding dim", "image_size": "image size", "context_length": "context length",
             "vocab_size": "vocab size", "compute_dtype": "compute dtype"}  # dtype: as the weights are stored
    write_stdout("".join(f"{names.get(key, key) + ':':<16}{value}\n" for key, value in shown.items()))


@command(cls=ClipCommand)
@handle_errors
def models(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object instead of lines for people.")] = False,
    debug: DebugOpt = False,
) -> None:
    """List the CLIP models in the local Hugging Face cache (usable offline) and the model aliases.

    Example:

      clip models
    """
    import json

    from clipcli import output as out
    from clipcli.resolve import ALIASES, cached_models, hub_cache

    found = cached_models()
    cache = hub_cache()
    if as_json:
        write_stdout(json.dumps({
            "cache": str(cache),
            "models": [{"id": m.repo_id, "path": str(m.snapshot), "size_bytes": m.size_bytes,
                        "aliases": list(m.aliases)} for m in found],
            "aliases": ALIASES,
        }, ensure_ascii=False) + "\n")
        return
    cached = {m.repo_id for m in found}
    lines = [f"CLIP models in the Hugging Face cache ({out.display_path(str(cache))}):"]
    rows = [[m.repo_id, f"{m.size_bytes / 1e6:,.1f} MB", ", ".join(m.aliases)] for m in found]
    lines += ["  " + line for line in out.table_text(["model", "size", "alias"], rows).splitlines()] if rows else [
        "  none yet: a Hub id given to -m is downloaded there on first use"]
    lines += ["", "Aliases (-m NAME, any case):"]
    alias_rows = [[alias, hub_id, "cached" if hub_id in cached else ""] for alias, hub_id in ALIASES.items()]
    lines += ["  " + line for line in out.table_text(["alias", "model", ""], alias_rows).splitlines()]
    write_stdout("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------ helpers


def _read_bytes(path: Path | str, option: str) -> bytes:
    """A file's bytes; '-' is stdin. A missing or unreadable file is a UsageError naming `option`."""
    try:
        return sys.stdin.buffer.read() if str(path) == "-" else Path(path).read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{option} '{path}' does not exist; give a text file, one item per line") from None
    except OSError as err:
        raise UsageError(f"cannot read {option} '{path}': {err.strerror or err}; give a readable text file") from None


def _read_lines(path: Path, option: str, *, strip: bool = True) -> list[str]:
    """The non-blank lines of a UTF-8 text file (a leading byte-order mark dropped); '-' is stdin. Stripped of
    surrounding white space (names: labels, classes); else (texts) only the line's end, LF or CRLF, is taken off."""
    try:
        raw = _read_bytes(path, option).decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UsageError(f"cannot read {option} '{path}': {err}; give a UTF-8 text file") from None
    if strip:
        return [line.strip() for line in raw.splitlines() if line.strip()]
    return [line.removesuffix("\r") for line in raw.split("\n") if line.strip()]


def _one_stdin_reader(*options: tuple[str, object]) -> None:
    """UsageError when more than one option would read stdin ('-')."""
    readers = [name for name, value in options if value is not None and str(value) == "-"]
    if len(readers) > 1:
        raise UsageError(f"{' and '.join(readers)} both read stdin ('-'); give one of them a file")


def _find_inputs(paths: list[str] | None, files_from: str | None, exclude: list[str] | None,
                 max_megapixels: str | None) -> tuple[list[str], list[Failure]]:
    """The images of PATHs and --files-from (--exclude applied) and the inputs that failed; sets the pixel limit;
    warns when there are none."""
    images, failures = _gather_inputs(paths, files_from, exclude, max_megapixels)
    _warn_if_no_images(images, failures)
    return images, failures


def _gather_inputs(paths: list[str] | None, files_from: str | None, exclude: list[str] | None,
                   max_megapixels: str | None, skip: list[str] | None = None) -> tuple[list[str], list[Failure]]:
    """_find_inputs without the warning; the folders in `skip` are never walked."""
    from clipcli.inputs import Exclude, find_images, parse_path_list

    if not paths and files_from is None:
        raise UsageError("no images given; pass image files or folders, or --files-from FILE (- reads stdin)")
    _size_limit(max_megapixels)
    listed = parse_path_list(_read_bytes(files_from, "--files-from")) if files_from is not None else []
    return find_images(paths or [], Exclude(tuple(exclude or ())), listed, skip or ())


def _size_limit(max_megapixels: str | None) -> None:
    """Apply --max-megapixels, or Pillow's default without it: process-wide, so the program's to set, not the
    library's (and set by every command, so one in-process run never leaks its limit into the next)."""
    from clipcli.preprocess import reset_max_megapixels, set_max_megapixels

    if max_megapixels is None:
        reset_max_megapixels()
    else:
        set_max_megapixels(_megapixels(max_megapixels))


def _megapixels(value: str) -> float | None:
    """--max-megapixels: a positive number, or none (no limit)."""
    if value.strip().lower() == "none":
        return None
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not number > 0 or number == float("inf"):
        raise UsageError(f"--max-megapixels '{value}' is not a positive number; give megapixels such as 200, or "
                         "none for no limit")
    return number


def _records(items: list) -> list:
    """Rows in path order for a RowWriter: records as they are, failures as {"path", "error"} rows."""
    from clipcli.inputs import Failure
    from clipcli.output import failure_record

    return [failure_record(item.path, item.reason) if isinstance(item, Failure) else item for item in items]


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


def _warn_if_one_label(labels: list[str], score: str) -> None:
    # Said once the results are in, so that it never precedes a usage error's single line.
    if len(labels) == 1 and score == "prob":
        warn(f"with one label every image scores 100% for '{labels[0]}'; use --score cosine (with --min-score) to "
             "judge each image on its own, or give more labels")


def _ray_engine() -> ModuleType:
    """The Ray engine module (clipcli.engines.ray), or the UsageError that names the extra to install."""
    from clipcli.engines import ray_engine

    return ray_engine()


def _print_failures(failures: list[Failure]) -> None:
    for failure in sorted(failures, key=lambda f: f.path):  # walk and decode failures, in one path order
        eprint(f"{failure.path}: {failure.reason}")


def _finish(failures: list[Failure]) -> None:
    _print_failures(failures)
    if failures:
        eprint(f"{len(failures)} input(s) failed; the others were processed")
        raise typer.Exit(EXIT_SOME_FAILED)


def main() -> None:
    """Console entry point of both `clip` and `clipcli` (the same program, for systems where `clip` is taken)."""
    install_signal_handlers()
    guard_standard_streams()
    invoked = os.path.basename(sys.argv[0]) if sys.argv else ""
    try:
        app(prog_name="clipcli" if invoked.startswith("clipcli") and not invoked.endswith(".py") else "clip")
    finally:
        ignore_signals()  # the command has ended: a Ctrl-C now, while Python shuts down, changes nothing


if __name__ == "__main__":
    main()
