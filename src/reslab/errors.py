"""The one error type a user can cause: the CLI prints its message on one line and exits non-zero."""


class ReslabError(ValueError):
    """A problem with the user's input (a name, a file, an option), stated so they can fix it."""
