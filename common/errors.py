"""The one exception type for mistakes a user can make (bad path, wrong adapter, corrupt file)."""


class UserError(Exception):
    """A problem with the user's input: reported as one line on stderr, exit code 2."""
