"""Errors of the adapter store; each message names the bad value (user, version, file, item).

A server maps them to status codes: InvalidUserId/HistoryError -> 400/422, UnknownUser/
UnknownVersion/NoAdapter -> 404, UserExists -> 409, QuotaExceeded -> 413, CorruptAdapterError -> 409.
"""
from __future__ import annotations


class StoreError(Exception):
    """Base class of every store error."""


class InvalidUserId(StoreError, ValueError):
    pass


class UnknownUser(StoreError, LookupError):
    pass


class UserExists(StoreError, ValueError):
    pass


class UnknownVersion(StoreError, LookupError):
    pass


class NoAdapter(StoreError, LookupError):
    """The user has no (active) adapter version yet."""


class HistoryError(StoreError, ValueError):
    """A history item that cannot be stored: wrong shape, missing field, duplicate id, wrong task."""


class QuotaExceeded(HistoryError):
    """Storing the items would take the user past a history quota (items or bytes)."""


class JobError(StoreError, ValueError):
    pass


class CorruptAdapterError(StoreError):
    """An adapter file is missing or does not match the checksum recorded when it was written."""

    def __init__(self, user_id: str, version: int, file: str, reason: str):
        self.user_id, self.version, self.file, self.reason = user_id, version, file, reason
        super().__init__(f"user {user_id!r} adapter v{version}: file {file!r} {reason}")
