"""The exceptions the CLI turns into exit codes.

`UserError` (bad config, model folder or data file) -> one line, exit 2.
`CheckFailed` (a parity check or a gate goal did not hold) -> exit 1.
Anything else is a bug: the CLI shows its traceback only with `--debug`.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: names where (file, field, line) and what was expected."""

    def __init__(self, message: str, *, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class CheckFailed(Exception):
    """A parity check or gate goal failed; the message says which and by how much."""
