"""Errors that the CLI turns into a one-line message and exit code 2."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message ("" when it has none): one-line errors quote it."""
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


class InputError(Exception):
    """Bad input from the user: a file, a row, a column or an option. Message names the file (and row)."""


class RowsFailed(Exception):
    """Every row of a stage's output failed (each kept with its status): the CLI prints this one line
    and exits with code 3 (not 2: the input was well-formed), unless --allow-failures."""
