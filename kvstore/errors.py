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


class IntegrityError(StoreError):
    """Stored data or metadata is damaged or missing: the store refuses to return it."""


class CorruptChunkError(IntegrityError):
    """Stored KV bytes failed their checksum, could not be decoded, or their file is missing."""


class CorruptMetadataError(IntegrityError):
    """A metadata file (``zarr.json``) is unreadable, fails its digest, or is missing."""


class ContentMismatchError(CorruptChunkError):
    """Stored KV bytes are intact but not the ones their node recorded a hash of (a file copied or
    swapped in from another node, or left from a deleted generation of the run)."""
