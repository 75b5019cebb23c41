"""The one exception type the UI and CLI show to people as-is."""


class HyperrealError(Exception):
    """A problem the user can fix. ``str(err)`` says what is wrong and how to fix it."""
