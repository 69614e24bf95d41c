"""Errors that the CLI turns into a one-line message and exit code 2."""


class InputError(Exception):
    """Bad input from the user: a file, a row, a column or an option. Message names the file (and row)."""
