"""The `clip` command: parse options, call one pipeline function, render with output.py, choose the exit code.
One handler maps ClipError to a one-line message (exit 2) and interruption to 130/143. Heavy imports stay inside
commands so `clip --help` is fast."""

from __future__ import annotations

import functools
import os
import signal
import sys
import warnings
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer import _click as click
from typer.core import TyperGroup

from clipcli.errors import ClipError, InputError, UsageError

DEFAULT_MODEL = "openai/clip-vit-base-patch32"  # also resolve.DEFAULT_MODEL; kept here to keep --help light


class OneLineErrors(TyperGroup):
    """Command-line parsing errors (unknown option, missing argument, invalid value) as one 'error: ...' line with
    exit 2, like every other usage error, instead of click's usage text, hint and 'Error:' line."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as err:  # bare `clip`: the help, as before
            err.show()
            sys.exit(err.exit_code)
        except click.exceptions.UsageError as err:
            where = f"; see '{err.ctx.command_path} --help'" if err.ctx is not None else ""
            _eprint(f"error: {' '.join(err.format_message().split()).rstrip('.')}{where}")
            sys.exit(err.exit_code)
        except click.exceptions.ClickException as err:
            err.show()
            sys.exit(err.exit_code)
        except typer.Abort:
            _eprint("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


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


class Terminated(BaseException):
    """SIGTERM arrived: unwind like KeyboardInterrupt so temp files are cleaned up, then exit 143."""


def _on_signal(signum: int, frame: object) -> None:
    # From the first SIGINT or SIGTERM on, both are ignored: a second Ctrl-C must not cut short the cleanup of temp
    # files that the first one started (or turn it into a traceback).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


def _eprint(message: str) -> None:
    from clipcli.output import display_line

    print(display_line(message), file=sys.stderr, flush=True)


def handle_errors(command: Callable) -> Callable:
    """Run a command: ClipError -> 'error: ...' + exit 2, Ctrl-C -> 130, SIGTERM -> 143, output pipe closed by its
    reader -> 141 without a message; warnings silenced."""

    @functools.wraps(command)
    def wrapper(*args: object, **kwargs: object) -> None:
        debug = bool(kwargs.get("debug"))
        try:
            with warnings.catch_warnings():
                if not debug:
                    warnings.simplefilter("ignore")
                command(*args, **kwargs)
        except UsageError as err:
            if debug:
                raise
            _eprint(f"error: {err}")
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            _eprint("interrupted; no output was written")
            raise typer.Exit(130) from None
        except Terminated:
            _eprint("terminated; no output was written")
            raise typer.Exit(143) from None
        except BrokenPipeError:
            # The reader of our output went away (`clip ... | head`): stop quietly with 128 + SIGPIPE, as a shell
            # tool killed by SIGPIPE would, and point stdout at /dev/null so the flush at exit cannot fail again.
            _silence_stdout()
            raise typer.Exit(141) from None

    return wrapper


def _write_stdout(text: str) -> None:
    """All of `text` to stdout. An unbuffered stdout (python -u, PYTHONUNBUFFERED) takes one write() call per
    write, which a pipe may only partly accept (its reader quit mid-way): loop until all is written or the
    reader's departure raises BrokenPipeError, instead of dropping the rest silently."""
    sys.stdout.flush()
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    rest = memoryview(text.encode(sys.stdout.encoding or "utf-8", sys.stdout.errors or "strict"))
    while rest:
        written = buffer.write(rest)
        rest = rest[written or 0:]
    buffer.flush()


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real stdout (e.g. captured by a test runner): nothing to flush there
        pass


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


ModelOpt = Annotated[str, typer.Option(
    "--model", "-m", envvar="CLIP_MODEL",
    help="Hugging Face CLIP directory, OpenAI-format .pt checkpoint, or Hub id.")]
DeviceOpt = Annotated[str, typer.Option(help="auto (cuda, then mps, then cpu), cpu, cuda or mps.")]
DtypeOpt = Annotated[str, typer.Option(
    help="auto (fp32 on CPU, identical to the reference; fp16 on CUDA), fp32, fp16 or bf16.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Images per model call.")]
WorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", min=1, help="Image decoding threads (default: one per CPU core).")]
FastOpt = Annotated[bool, typer.Option(
    "--fast-decode", help="Decode large JPEGs at reduced scale before the exact resize (faster, near-identical).")]
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


@app.command()
@handle_errors
def classify(
    paths: PathsArg,
    labels: Annotated[Optional[list[str]], typer.Option(
        "--labels", "-l", help="Comma-separated labels: cat,dog,car (repeatable: -l cat -l dog).")] = None,
    labels_file: Annotated[Optional[Path], typer.Option(help="File with one label per line (- reads stdin).")] = None,
    template: Annotated[Optional[list[str]], typer.Option(
        "--template", "-t", help="Prompt template, {} is the label; repeat to ensemble. [default: a photo of a {}.]")] = None,
    templates: Annotated[Optional[str], typer.Option(help="A named template set: imagenet (the CLIP paper's 80).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Labels shown per image.")] = 5,
    fmt: Annotated[Format, typer.Option(
        "--format", "-f", help="table for people; csv, json or jsonl for programs.")] = Format.table,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Write results here (default stdout; - is stdout too).")] = None,
    model: ModelOpt = DEFAULT_MODEL,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    workers: WorkersOpt = None,
    fast_decode: FastOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Score images against labels: which words fit which images.

    Examples:

      clip classify photos/ --labels cat,dog,car

      clip classify a.jpg b.png -l cat,dog --templates imagenet -f jsonl -o out.jsonl
    """
    from clipcli import output as out
    from clipcli import pipeline

    label_list = _read_labels(labels, labels_file)
    out.check_labels_for(fmt.value, label_list)
    prompt_templates = _templates(template, templates)
    if output is not None and str(output) == "-":
        output = None
    if output is not None:
        out.check_writable(output)
    images, failures = pipeline.find_images(paths)
    _warn_if_no_images(images, failures)
    if output is not None:
        out.check_not_an_input([output], images)
    clip = _load(model, device, dtype)
    for label in label_list:
        if any(clip.tokenizer.is_truncated(t.replace("{}", label)) for t in prompt_templates):
            _eprint(f"warning: label '{label}' is longer than the model's {clip.tokenizer.context_length}-token "
                    "context and was truncated")
    found_paths: list[str] = []
    rows = []
    with _progress(len(images), quiet) as advance:
        for batch in pipeline.classify(clip, images, label_list, prompt_templates, batch_size, workers, fast_decode,
                                       on_failure=failures.append, progress=advance):
            found_paths.extend(batch.paths)
            rows.append(batch.rows)
    import numpy as np

    probs = np.concatenate(rows) if rows else np.zeros((0, len(label_list)), dtype=np.float32)
    text = out.render(out.records(found_paths, probs, label_list, top_k), label_list, fmt.value,
                      color=output is None and fmt is Format.table and sys.stdout.isatty())
    if output is None:
        _write_stdout(text)
    else:
        out.write_text(output, text)
    _finish(failures)


@app.command()
@handle_errors
def embed(
    paths: Annotated[Optional[list[str]], typer.Argument(metavar="PATH", help="Image files and/or folders.",
                                                         show_default=False)] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="The .npy to write; PATHS go to <name>.paths.txt.")] = Path("embeddings.npy"),
    text: Annotated[Optional[list[str]], typer.Option("--text", help="Embed this text instead of images (repeatable).")] = None,
    text_file: Annotated[Optional[Path], typer.Option(
        help="Embed each line of this file (blank lines skipped; - reads stdin).")] = None,
    no_normalize: Annotated[bool, typer.Option("--no-normalize", help="Raw projected features, not L2-normalised.")] = False,
    model: ModelOpt = DEFAULT_MODEL,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    workers: WorkersOpt = None,
    fast_decode: FastOpt = False,
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
    failures: list = []
    images: list[str] = []
    if not texts:
        images, failures = pipeline.find_images(paths or [])
        _warn_if_no_images(images, failures)
        out.check_not_an_input(files, images)
    clip = _load(model, device, dtype)
    for item in texts:
        if clip.tokenizer.is_truncated(item):
            _eprint(f"warning: text '{item[:60]}{'…' if len(item) > 60 else ''}' is longer than the model's "
                    f"{clip.tokenizer.context_length}-token context and was truncated")
    writer = out.EmbeddingWriter(output)
    try:
        if texts:
            for batch in pipeline.embed_texts(clip, texts, normalized=not no_normalize):
                writer.add(batch.paths, batch.rows)
        else:
            with _progress(len(images), quiet) as advance:
                for batch in pipeline.embed_images(clip, images, not no_normalize, batch_size, workers, fast_decode,
                                                   on_failure=failures.append, progress=advance):
                    writer.add(batch.paths, batch.rows)
        writer.close(clip.config.projection_dim)
    except BaseException:
        writer.abort()
        raise
    _finish(failures)


@app.command("convert-weights")
@handle_errors
def convert_weights(
    src: Annotated[str, typer.Argument(help="OpenAI/OpenCLIP checkpoint, or a Hugging Face CLIP directory/file.")],
    dst: Annotated[Path, typer.Argument(help="Directory to write in Hugging Face CLIP layout.")],
    dtype: Annotated[str, typer.Option(help="fp32, fp16 or bf16 for the saved weights.")] = "fp32",
    activation: Annotated[Optional[str], typer.Option(
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
    _eprint(f"wrote {written}")


@app.command()
@handle_errors
def info(
    model: Annotated[str, typer.Argument(envvar="CLIP_MODEL", help="Directory, checkpoint file or Hub id.")] = DEFAULT_MODEL,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    debug: DebugOpt = False,
) -> None:
    """Describe a model: architecture, parameters, dtype, image size, context length, source."""
    clip = _load(model, device, dtype)
    config = clip.config
    params = sum(p.numel() for p in clip.model.parameters())
    vision, text = config.vision, config.text
    lines = [
        ("source", clip.source),
        ("architecture", f"ViT-{vision.patch_size} vision ({vision.num_hidden_layers} layers, width "
                         f"{vision.hidden_size}, {vision.num_attention_heads} heads) + text transformer "
                         f"({text.num_hidden_layers} layers, width {text.hidden_size}, {text.num_attention_heads} heads)"),
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


def _load(model: str, device: str, dtype: str):  # -> loader.Clip
    from clipcli.loader import load
    from clipcli.pipeline import keep_freed_memory

    keep_freed_memory()  # process-wide malloc setting: this program's to choose, measured in benchmarks/README.md

    return load(model, device=device, dtype=dtype)


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
    if labels and labels_file is not None:
        raise UsageError("give --labels or --labels-file, not both")
    if labels_file is not None:
        items = _read_lines(labels_file, "--labels-file")
    else:
        items = [item.strip() for group in labels or [] for item in group.split(",") if item.strip()]
    if not items:
        raise UsageError("no labels; pass --labels cat,dog,car or --labels-file FILE (one label per line)")
    seen: set[str] = set()
    for item in items:
        _check_utf8("label", item)
        if item in seen:
            raise UsageError(f"label '{item}' is given twice; list each label once")
        seen.add(item)
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


class _progress:
    """A rich progress bar on stderr (images/s, ETA), hidden when stderr is no terminal or with --quiet."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.enabled = not quiet and total > 0 and sys.stderr.isatty()
        self.total = total

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                                   TimeRemainingColumn)
        from rich.text import Text

        class Rate(ProgressColumn):
            def render(self, task) -> Text:
                speed = task.finished_speed or task.speed
                return Text(f"{speed:.1f} img/s" if speed else "")

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            Rate(), TimeRemainingColumn(),
                            console=Console(file=sys.stderr), transient=True)
        self.bar.__enter__()
        task = self.bar.add_task("images", total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)


def _warn_if_no_images(images: list[str], failures: list) -> None:
    if not images and not failures:
        from clipcli.pipeline import IMAGE_EXTENSIONS

        _eprint("warning: no images found; images are recognised by extension ("
                + " ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS)) + ")")


def _finish(failures: list) -> None:
    for failure in sorted(failures, key=lambda f: f.path):  # walk and decode failures, in one path order
        _eprint(f"{failure.path}: {failure.reason}")
    if failures:
        _eprint(f"{len(failures)} input(s) failed; the others were processed")
        raise typer.Exit(1)


def main() -> None:
    """Console entry point."""
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    app(prog_name="clip")


if __name__ == "__main__":
    main()
