"""The project's one exception for user mistakes and bad input.

Library code raises :class:`UserError` with a message that names the file, field or value at fault and
says what to do. The CLI prints it as a single line on stderr and exits with code 2; tracebacks are for
bugs, not for a missing file.
"""


class UserError(Exception):
    """A mistake the user can fix (bad path, unknown preset, malformed file...)."""
