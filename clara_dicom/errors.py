"""Errors a user can fix. The CLI prints them as one line, never a traceback."""


class UserError(Exception):
    """A problem with the user's input or environment (bad config, port in use...).

    The message must say what to fix, on one line.
    """

    exit_code = 2
