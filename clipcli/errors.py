"""The error types of clipcli. Library code raises these; only cli.py turns them into exit codes."""


class ClipError(Exception):
    """Base of every error clipcli raises on purpose."""


class UsageError(ClipError):
    """A usage or setup error (bad option, missing model, malformed checkpoint): exit code 2.

    The message is one line: `<what>; <how to fix>`.
    """


class InputError(ClipError):
    """One input (image file, text) could not be processed; the others go on, exit code 1 at the end."""


def os_reason(err: OSError) -> str:
    """An OSError as a short lower-case reason for a one-line message: "permission denied", "no such file..."."""
    return (err.strerror or type(err).__name__).lower()
