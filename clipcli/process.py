"""Process plumbing for the `clip` program: exit codes, signals, stderr messages, stdout writing, and process-wide
settings. Errors become one line and an exit code here; commands in cli.py never see signals or broken pipes."""

from __future__ import annotations

import ctypes
import functools
import os
import re
import signal
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import typer
from typer import _click as click
from typer.core import TyperCommand, TyperGroup

from clipcli.errors import InputError, OptionError, UsageError

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED, EXIT_BROKEN_PIPE, EXIT_TERMINATED = 130, 141, 143

# The flag behind each library parameter name, for OptionError messages.
FLAGS = {"device": "--device", "dtype": "--dtype", "batch_size": "--batch-size", "workers": "--workers",
         "hidden_act": "--activation", "force": "--force", "labels": "--labels", "templates": "--template",
         "output": "--output", "fmt": "--format", "index": "--index", "top_k": "--top-k", "score": "--score",
         "min_score": "--min-score", "into": "--into", "undo": "--undo", "class_names": "--class-names",
         "dataset": "DATASET", "exclude": "--exclude", "files_from": "--files-from",
         "max_megapixels": "--max-megapixels", "query": "QUERY", "query_image": "query image",
         "subtract": "--subtract", "threshold": "--threshold"}


# Process-wide facts about the standard streams, for the messages that end a run (this module is the program's).
_stdout_closed = False  # the shell started us with stdout closed (`>&-`): results have nowhere to go
_streamed = False  # part of this command's results went out on a stream (stdout, a pipe): an interrupt cuts them
_kept: str | None = None  # what an interrupted run of this command keeps, when its work is not an output file


def guard_standard_streams() -> None:
    """Point a standard stream that was closed at start (`<&-`, `>&-`, `2>&-`) at /dev/null, so that no file this
    process opens takes its descriptor number, `-` reads as empty and messages never land among results; a closed
    stdout is remembered, and writing results to it is a usage error (write_stdout). Once, at program start."""
    global _stdout_closed
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        devnull = os.open(os.devnull, os.O_RDONLY if fd == 0 else os.O_WRONLY)
        if devnull != fd:  # the lowest free number: fd itself, unless a lower one is closed too
            os.dup2(devnull, fd)
            os.close(devnull)
        setattr(sys, name, open(fd, "r" if fd == 0 else "w", encoding="utf-8",  # noqa: SIM115
                                errors="backslashreplace", closefd=False))
        if fd == 1:
            _stdout_closed = True


def note_kept(what: str) -> None:
    """This command's work is kept as it goes (`clip index`): an interrupted run says so, not "no output"."""
    global _kept
    _kept = what


def note_streamed() -> None:
    """Results have started to go out on a stream: an interrupted run says they are incomplete."""
    global _streamed
    _streamed = True


def eprint(message: str) -> None:
    """One line on stderr: control characters and line breaks in it escaped, so a file name cannot split it."""
    from clipcli.output import display_line

    print(display_line(message), file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """A `warning: ...` line on stderr."""
    eprint(f"warning: {message}")


class OneLineErrors(TyperGroup):
    """Command-line parsing errors (unknown option, missing argument, invalid value) as one 'error: ...' line with
    exit 2, like every other usage error, instead of click's usage text, hint and 'Error:' line."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,  # type: ignore[override]
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
            message = bad_value_message(err) if isinstance(err, click.exceptions.BadParameter) else None
            eprint(f"error: {message or ' '.join(err.format_message().split()).rstrip('.')}{where}")
            sys.exit(err.exit_code)
        except click.exceptions.ClickException as err:
            err.show()
            sys.exit(err.exit_code)
        except typer.Abort:
            eprint("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


class ClipCommand(TyperCommand):
    """A command whose --help names values, not Python types: Typer would show `PATH <list[str]>` for an argument
    (options say what they take through their metavar, e.g. `--dtype [auto|fp32|fp16|bf16]`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if getattr(param, "param_type_name", "") == "argument" and param.metavar:
                setattr(param, "display_type_rich", lambda ctx: None)  # noqa: B010 (an instance's method)


# click's own wording of a rejected value, which starts with the value: "'yaml' is not one of ...", "0 is not in the
# range x>=1", "'x' is not a valid integer".
_CLICK_VALUE = re.compile(r"^(?:Value error, )?'?(.*?)'? is not (?:one of|in the range|a valid)", re.S)
_BOUNDS = {"greater_than_equal": "at least", "greater_than": "more than", "less_than_equal": "at most",
           "less_than": "less than"}


def bad_value_message(err: click.exceptions.BadParameter) -> str | None:
    """A rejected option value in plain words, with the choices where there are some: "--format 'yaml' is not one
    of the choices; use one of table, csv, json, jsonl". None when the error is not about one given value.

    Typer up to 0.28 checks values with click's types; 0.29 with pydantic, whose error carries the value."""
    param = err.param
    if param is None or isinstance(err, click.exceptions.MissingParameter):
        return None
    options = [opt for opt in getattr(param, "opts", []) if opt.startswith("-")]
    name = max(options, key=len) if options else (param.metavar or param.name or "value").rstrip(".")
    message = " ".join(str(err.message).split()).rstrip(".")
    details = getattr(err.__cause__, "errors", None)
    first = details()[0] if callable(details) and details() else {}
    found = _CLICK_VALUE.match(message)
    value = first.get("input", found.group(1) if found else None)
    kind = first.get("type") or type(getattr(param, "type", None)).__name__
    descriptor = getattr(param, "type_descriptor", None)
    listed = descriptor.choices if descriptor is not None and descriptor.is_choice else getattr(
        getattr(param, "type", None), "choices", None)
    choices = [getattr(choice, "value", choice) for choice in listed or ()]
    shown = f"{name} '{value}'" if value is not None else name
    if choices:
        return f"{shown} is not one of the choices; use one of {', '.join(map(str, choices))}"
    limits = first.get("ctx") or {}
    low, high = getattr(param.type, "min", None), getattr(param.type, "max", None)  # click's IntRange, FloatRange
    if kind in _BOUNDS:
        return f"{shown} is out of range; it must be {_BOUNDS[kind]} {next(iter(limits.values()), '?')}"
    if "in the range" in message and (low is not None or high is not None):
        bound = f"at least {low}" if high is None else f"at most {high}" if low is None else f"{low} to {high}"
        return f"{shown} is out of range; it must be {bound}"
    if kind in ("int_parsing", "int_from_float", "IntParamType", "IntRange"):
        return f"{shown} is not a whole number"
    if kind in ("float_parsing", "float_type", "FloatParamType", "FloatRange"):
        return f"{shown} is not a number"
    text = message.removeprefix("Value error, ")
    return f"{shown}: {text[:1].lower()}{text[1:]}"


class Terminated(BaseException):
    """SIGTERM arrived: unwind like KeyboardInterrupt so temp files are cleaned up, then exit 143."""


def _on_signal(signum: int, frame: object) -> None:
    # From the first SIGINT or SIGTERM on, both are ignored: a second Ctrl-C must not cut short the cleanup of temp
    # files that the first one started (or turn it into a traceback).
    ignore_signals()
    raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM unwind the command (temp files removed), then exit 130 / 143."""
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)


def ignore_signals() -> None:
    """From here on, SIGINT and SIGTERM change nothing: during the cleanup the first one started, and once the
    command has ended (its output written, its last line said), so that the process exits with the command's code.
    Left to Python, one arriving while the interpreter shuts down (torch's teardown takes a moment) killed the
    process by the signal after a successful run."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def error_message(err: UsageError) -> str:
    """The one stderr line of a usage error, in flag wording."""
    if isinstance(err, OptionError):
        return f"error: {err.worded(FLAGS.get(err.name, err.name))}"
    return f"error: {err}"


def handle_errors(command: Callable) -> Callable:
    """Run a command: UsageError -> 'error: ...' + exit 2, an InputError that escapes -> its line + exit 1, Ctrl-C ->
    130, SIGTERM -> 143, output pipe closed by its reader -> 141 without a message; library warnings silenced."""

    @functools.wraps(command)
    def wrapper(*args: object, **kwargs: object) -> None:
        global _streamed, _kept
        debug = bool(kwargs.get("debug"))
        _streamed, _kept = False, None
        try:
            with warnings.catch_warnings():
                if not debug:
                    warnings.simplefilter("ignore")
                command(*args, **kwargs)
        except UsageError as err:
            if debug:
                raise
            eprint(error_message(err))
            raise typer.Exit(EXIT_USAGE) from None
        except InputError as err:
            eprint(f"error: {err}")
            raise typer.Exit(EXIT_SOME_FAILED) from None
        except (KeyboardInterrupt, Terminated) as stop:
            raise stopped_by(stop, f"; {_what_was_written()}") from None
        except BrokenPipeError:
            # The reader of our output went away (`clip ... | head`): stop quietly with 128 + SIGPIPE, as a shell
            # tool killed by SIGPIPE would, and point stdout at /dev/null so the flush at exit cannot fail again.
            silence_stdout()
            raise typer.Exit(EXIT_BROKEN_PIPE) from None
        except (typer.Exit, click.exceptions.ClickException):
            raise  # the command's own way out (a RuntimeError to Python), already worded
        except Exception as err:
            # The signal handler raises wherever the main thread is; inside threading's or Ray's own code, that
            # code's cleanup may then fail in turn (threading: "cannot release un-acquired lock"), and the error
            # that reaches here only holds the interruption as its context. It is the interruption.
            behind = interruption_behind(err)
            if behind is None:
                raise
            raise stopped_by(behind, f"; {_what_was_written()}") from None

    return wrapper


def stopped_by(stop: BaseException, what: str) -> typer.Exit:
    """Say on stderr that Ctrl-C (KeyboardInterrupt) or SIGTERM (Terminated) stopped the run, "interrupted" or
    "terminated" followed by `what`; the exit to raise for it, 130 or 143."""
    interrupted = isinstance(stop, KeyboardInterrupt)
    eprint(f"{'interrupted' if interrupted else 'terminated'}{what}")
    return typer.Exit(EXIT_INTERRUPTED if interrupted else EXIT_TERMINATED)


def interruption_behind(err: BaseException) -> BaseException | None:
    """The KeyboardInterrupt or Terminated (SIGTERM) that `err` was raised while handling, if any: a signal arrives
    wherever the main thread is, and code it cuts short may fail with another error. None for any other error."""
    item: BaseException | None = err
    for _ in range(20):
        if item is None:
            return None
        if isinstance(item, (KeyboardInterrupt, Terminated)):
            return item
        # `raise ... from None` says the error is not about what was being handled
        item = item.__cause__ or (None if item.__suppress_context__ else item.__context__)
    return None


def _what_was_written() -> str:
    # Files are written whole or not at all; rows streamed to stdout before the interrupt are out there.
    if _kept is not None:
        return _kept
    return "the results written so far are incomplete" if _streamed else "no output was written"


def write_stdout(text: str) -> None:
    """All of `text` to stdout, flushed. An unbuffered stdout (python -u, PYTHONUNBUFFERED) takes one write() call
    per write, which a pipe may only partly accept (its reader quit mid-way): loop until all is written or the
    reader's departure raises BrokenPipeError, instead of dropping the rest silently."""
    if _stdout_closed:
        raise UsageError("stdout is closed, so the results have nowhere to go; redirect it (> FILE) or pass -o FILE")
    note_streamed()
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


def silence_stdout() -> None:
    """Point stdout at /dev/null (its reader is gone)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real stdout (e.g. captured by a test runner): nothing to flush there
        pass


# glibc's mallopt parameters, from malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the OS; False if not glibc.

    Every batch allocates and frees the same large buffers (decoded photos, (B, T, 4D) activations). By default
    glibc maps many of them fresh and unmaps them on free, so each batch page-faults them in again: about 15% of
    decode time and up to a fifth of model time on CPU (benchmarks/README.md). Process-wide, so it is for a
    program to call once at start (the CLI), never at import. Peak memory is unchanged; freed memory stays with
    the process for reuse until it exits."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # No mmap'd blocks, so large buffers come from the heap and are reused; trim the heap only past 1 GiB free.
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
