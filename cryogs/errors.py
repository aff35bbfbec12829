"""User-facing errors: the CLI prints these as one line, without a traceback."""


class CryogsError(Exception):
    """An input or configuration problem the user can fix; the message says what and where."""
