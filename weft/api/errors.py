"""The root of weft's one exception tree, in the bottom layer.

Every failure a caller can see is a `WeftError`. The root and the errors of decoding what
crosses a process or a file (configuration, metadata, etcd records) live here, below every
package that raises them, so a boundary model raises a member of the tree directly instead of
a bare `ValueError` that a higher layer translates. They also stay `ValueError`s, as they
were. The data plane's errors (`weft.fabric.errors`) extend the same tree.
"""

from __future__ import annotations


class WeftError(Exception):
    """Root of every error raised by weft."""


class ConfigError(WeftError, ValueError):
    """A configuration value is out of range or inconsistent."""


class MetadataError(WeftError, ValueError):
    """Agent metadata could not be decoded: garbage, truncated, unsupported version."""


class AuthenticationError(WeftError):
    """A peer failed the group-secret handshake, or metadata carried no valid MAC."""


class RecordError(WeftError, ValueError):
    """A value under the group's prefix that is not a valid, authentic record."""


class InvalidKeyError(WeftError, ValueError):
    """A KV-store key of a type the store does not take, too long, or a single key (a str,
    bytes) where a sequence of keys was expected; the message names the key."""


class StorageError(WeftError):
    """A storage tier (KV store) failed an operation after its retries; nothing was stored
    half-way and nothing wrong was returned.

    Args:
        message: what failed, naming the key and the path or object where there is one.
        key: the KV-store key, when the failure concerns one chunk.
        path: the file or object name, when there is one.
    """

    def __init__(self, message: str, *, key: str | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.path = path


class StorageFullError(StorageError):
    """The storage ran out of space (``ENOSPC``): the chunk was not stored, and the copy the
    key held before, if any, is intact."""


class BatchError(WeftError):
    """Some keys of a batch call failed; every other key was done.

    Args:
        message: a summary naming the first failures.
        errors: the typed error of each failed key (its canonical form).
        results: the call's result per key, in order, a failed key holding None (``get_many``
            without buffers) or False (with buffers, and for ``put_many``).
    """

    def __init__(self, message: str, errors: dict[str, WeftError], results: list[object]) -> None:
        super().__init__(message)
        self.errors = errors
        self.results = results
