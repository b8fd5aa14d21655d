"""The error an HTTP handler or middleware raises to answer with a status and a message.

Here rather than in api/ so that auth.py (and anything else below api/) can raise it: the one
JSON error middleware in api/errors.py turns it into the answer.
"""

from __future__ import annotations

from collections.abc import Mapping


class ApiError(Exception):
    """An error answer with a status code and a message."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})
