"""The error types of clipcli and the one-line reasons they carry. Library code raises these with its own parameter
names; only cli.py turns them into flag wording and exit codes."""

from __future__ import annotations


class ClipError(Exception):
    """Base of every error clipcli raises on purpose."""


class UsageError(ClipError):
    """A usage or setup error (bad option, missing model, malformed checkpoint): exit code 2.

    The message is one line: `<what>; <how to fix>`.
    """


class OptionError(UsageError):
    """A usage error about one parameter, e.g. device 'cuda' without a GPU.

    The library words it with its parameter name (`device 'cuda': no CUDA GPU is available; use device cpu or auto`);
    the CLI, which knows the flag behind each parameter, re-words it with `worded('--device')`. `fix` may name the
    parameter again as `{option}`."""

    def __init__(self, name: str, value: object, problem: str, fix: str) -> None:
        self.name, self.value, self.problem, self.fix = name, value, problem, fix
        super().__init__(self.worded(name))

    def worded(self, option: str) -> str:
        """The one-line message with `option` (a parameter name or a flag) where the parameter is named."""
        what = self.problem if self.value is None else f"{option} '{self.value}': {self.problem}"
        return f"{what}; {self.fix.replace('{option}', option)}"


class InputError(ClipError):
    """One input (image file, text) could not be processed; the others go on, exit code 1 at the end."""


def os_reason(err: OSError) -> str:
    """An OSError as a short lower-case reason for a one-line message: "permission denied", "no such file..."."""
    return (err.strerror or type(err).__name__).lower()


def one_line(err: BaseException, limit: int = 140) -> str:
    """The first sentence of an exception's message on one line, with its type when the message alone is cryptic."""
    text = " ".join(str(err).split()).split(". ")[0]
    text = (text[:limit] + "…") if len(text) > limit else text
    return text if len(text) > 12 else f"{type(err).__name__}: {text}".rstrip(": ")
