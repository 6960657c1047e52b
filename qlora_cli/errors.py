"""The one error type for problems the user can fix; anything else is a bug and keeps its traceback."""


class QloraError(Exception):
    """A message that names what is wrong (key, row, file or adapter) and how to fix it."""
