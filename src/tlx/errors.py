"""The one error type for problems a user can fix; the CLI prints it as one line and exits 2."""


class TlxError(Exception):
    """A user-fixable problem: bad recipe, missing data or weights, broken plugin.

    The message is one line that names the file, key or value and says what would fix it.
    """
