"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""


class CxrcamError(Exception):
    """A user mistake or bad input: missing file, wrong column, unknown config key."""


class ImageReadError(CxrcamError):
    """An image that cannot be decoded. Batch jobs record it and carry on."""
