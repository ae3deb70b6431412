"""The one exception type for user mistakes.

Anything a user can fix (a wrong flag, a missing file, a cache without the needed view)
raises ``AdlError`` with the fix in the message. The CLI prints it on one line and exits
with code 2; the Python API lets it propagate.
"""


class AdlError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it."""
