"""Exceptions the command line turns into one line on stderr instead of a traceback."""


class DetfitError(RuntimeError):
    """A user-facing error: the message names the file/thing and the problem, no traceback."""

    exit_code = 2
    # True for errors every torchrun rank raises alike (they come from the command line or from
    # rank 0's decision): only rank 0 prints them
    same_on_every_rank = False


class Interrupted(DetfitError):
    """Training stopped on request (SIGTERM, Ctrl-C) after saving; the message says where and
    how to resume. The exit code is 128 + the signal number, as a shell reports a signal."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class RunRefused(DetfitError):
    """The run folder cannot be used as asked (held by another writer, or holding another run).
    Rank 0 decides and every rank raises the same message, so under torchrun only rank 0 prints
    it."""

    same_on_every_rank = True
