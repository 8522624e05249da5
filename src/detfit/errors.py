"""One exception type for problems a user can fix; the CLI prints it as one line."""


class DetfitError(RuntimeError):
    """A user-facing error: the message names the file/thing and the problem, no traceback."""
