"""The one error type for problems a user can fix; the CLI prints it as one line and exits 2."""

#: the longest value quoted in an error message; longer ones are cut
MAX_SHOWN = 200


class TlxError(Exception):
    """A user-fixable problem: bad recipe, missing data or weights, broken plugin.

    The message is one line that names the file, key or value and says what would fix it.
    """


def describe(exc: BaseException) -> str:
    """``Type: first line of the message``, cut to :data:`MAX_SHOWN` characters: an exception in words."""
    text = f"{type(exc).__name__}: {exc}".strip().removesuffix(":")
    return shorten(text.splitlines()[0] if text else type(exc).__name__)


def shorten(text: str, limit: int = MAX_SHOWN) -> str:
    """``text`` cut to ``limit`` characters, with how much was left out."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit} more characters)"
