"""User-facing errors.

A `SqonnxError` is a mistake the user can fix (a wrong path, a bad option, data that does not fit the
model). The CLI prints its message on one line and exits non-zero; anything else is a bug in sqonnx and
keeps its traceback.
"""


class SqonnxError(Exception):
    """A problem with the user's input; the message names it and says what to do."""
