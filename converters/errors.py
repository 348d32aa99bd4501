"""The one error type of the conversion package: a problem with the user's source, options or disk."""

from __future__ import annotations


class ConvertError(RuntimeError):
    """Conversion cannot go on; the message names the file, field or option at fault."""
