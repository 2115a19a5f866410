"""Typed errors of the control plane (etcd and group membership)."""

from __future__ import annotations

from weft.fabric.errors import WeftError


class EtcdError(WeftError):
    """etcd answered with an error this code does not handle."""


class EtcdUnavailableError(EtcdError):
    """No etcd endpoint answered within the deadline (down, partitioned or restarting)."""


class EtcdAuthError(EtcdError):
    """etcd refused the credentials (user/password or client certificate) or the permission."""


class EtcdCompactedError(EtcdError):
    """A watch asked for history that etcd has compacted away; re-read the state and watch on."""

    def __init__(self, message: str, compact_revision: int) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


class MembershipError(WeftError):
    """The group membership could not do what was asked (join refused, left, closed)."""
