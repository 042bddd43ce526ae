"""The one exception type for problems a user can cause with data (paths, layouts, options)."""


class DataError(ValueError):
    """A user-caused data problem; the message is one line that names the problem and the fix."""
