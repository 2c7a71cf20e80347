"""The one exception type the CLI turns into a clean one-line message."""


class KVPError(Exception):
    """A user-facing error: the message says what went wrong and what to do."""
