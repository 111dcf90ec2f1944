"""The one base of every error a user can cause and fix (a setting, a file, a folder, a device).

The command line turns any :class:`UserError` into its message and exit code 2, with no
traceback; an error that is not one is a bug and keeps its traceback. A new error type joins by
inheriting from it, so no handler needs a list of classes that someone has to keep up to date.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user asked for cannot be done; the message names the file, row or setting
    and what to do."""
