"""The one exception type for bad user input: entry points print its message as one line and exit 2."""


class UserError(ValueError):
    """An input (flag, file, model, size) that cannot be used; the message names it and what is valid."""
