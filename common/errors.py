"""The one exception type for mistakes a user can make (bad path, wrong adapter, corrupt file), and its messages."""


class UserError(Exception):
    """A problem with the user's input: reported as one line on stderr, exit code 2."""


def shorten(text: str, limit: int = 60) -> str:
    """A value quoted in a one-line message, cut to `limit` characters (a forged file can hold megabytes)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
