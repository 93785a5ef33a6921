"""User-facing errors: one clear line, never a traceback, from every CLI."""


class BdmError(Exception):
    """A user mistake or a refused file; the message says what was wrong and what to do."""
