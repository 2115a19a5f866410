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
