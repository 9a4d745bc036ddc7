"""The store's errors."""

from __future__ import annotations


class StoreError(Exception):
    """Base class of the store's errors."""


class StoreFormatError(StoreError):
    """The path is not a vinekv store, or one of a format version this code cannot read."""


class MissingEntryError(StoreError, KeyError):
    """A run or trajectory that is not in the store."""

    def __str__(self) -> str:
        return str(self.args[0])


class CorruptChunkError(StoreError):
    """Stored bytes failed their checksum (or could not be decoded)."""
