"""One etcd client per TransferGroup, shared by the drain step, the status mirror and the
finalizer.

Without it every reconcile and every mirror round opened its own gRPC channels and read the
group's Secrets again. Here a group's `GroupClient` lives as long as the group: its Secrets
(TLS material, join token) are re-read at most every `REFRESH_SECONDS`, and the client is
rebuilt only when what it was made from (endpoints, TLS files, credentials, token) changed.
Every client is bound to the operator's one event loop (kopf's), so handlers must be async.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from weft.api.errors import WeftError
from weft.api.settings import EtcdSettings, GroupRef
from weft.api.transfergroup import TransferGroupSpec
from weft.membership.client import GroupClient

log = logging.getLogger(__name__)

REFRESH_SECONDS = 10.0
"""How long a group's Secrets are trusted before they are read again."""

_TLS_FILES = (("ca.crt", "ca_file"), ("tls.crt", "cert_file"), ("tls.key", "key_file"))


class SecretReader(Protocol):
    """Reads a Kubernetes Secret (blocking): its data, decoded; raises when it is missing."""

    def __call__(self, name: str, namespace: str) -> Mapping[str, bytes]: ...


class TokenMissingError(WeftError):
    """The join token's Secret could not be read (the drain step and the mirror need it)."""


@dataclass
class _Entry:
    client: GroupClient
    fingerprint: str
    spec_etcd: dict[str, Any]
    checked_at: float
    tls_dir: tempfile.TemporaryDirectory[str] | None
    token_error: Exception | None = None


@dataclass(frozen=True)
class _Material:
    settings: EtcdSettings
    token: bytes | None
    token_error: Exception | None
    fingerprint: str
    tls_dir: tempfile.TemporaryDirectory[str] | None


class GroupClients:
    """The operator's group clients, keyed by namespace/name.

    Args:
        read_secret: reads a Secret (called through `asyncio.to_thread`).
        resolve_endpoints: the etcd endpoints with Service names resolved (blocking, too).
        refresh_seconds: how long a group's Secrets are trusted.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        read_secret: SecretReader,
        resolve_endpoints: Callable[[list[str]], list[str]],
        refresh_seconds: float = REFRESH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read_secret = read_secret
        self._resolve = resolve_endpoints
        self._refresh = refresh_seconds
        self._clock = clock
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def get(
        self, namespace: str, name: str, spec: TransferGroupSpec, *, need_token: bool = True
    ) -> GroupClient:
        """The group's client, rebuilt first when its material changed.

        Args:
            namespace: the group's namespace.
            name: the group's name.
            spec: its spec (etcd section: endpoints, Secrets).
            need_token: raise when the join token's Secret cannot be read (the finalizer
                needs no token and passes False).
        Returns:
            The client (owned here: do not close it).
        Raises:
            TokenMissingError: `need_token` and the token's Secret could not be read.
            KubeError: the TLS Secret could not be read.
        """
        key = (namespace, name)
        spec_etcd = spec.etcd.model_dump(mode="json")
        async with self._locks.setdefault(key, asyncio.Lock()):  # one refresh at a time
            entry = self._entries.get(key)
            fresh = (
                entry is not None
                and entry.spec_etcd == spec_etcd
                and self._clock() - entry.checked_at < self._refresh
            )
            if entry is None or not fresh:
                entry = await self._refreshed(key, spec, spec_etcd)
        if need_token and entry.token_error is not None:
            raise TokenMissingError(str(entry.token_error)) from entry.token_error
        return entry.client

    async def _refreshed(
        self, key: tuple[str, str], spec: TransferGroupSpec, spec_etcd: dict[str, Any]
    ) -> _Entry:
        material = await self._material(key[0], spec)
        old = self._entries.get(key)
        now = self._clock()
        if old is not None and old.fingerprint == material.fingerprint:
            if material.tls_dir is not None:
                material.tls_dir.cleanup()
            old.spec_etcd, old.checked_at, old.token_error = spec_etcd, now, material.token_error
            return old
        ref = GroupRef(namespace=key[0], group=key[1])
        entry = _Entry(
            client=GroupClient(material.settings, ref, material.token),
            fingerprint=material.fingerprint,
            spec_etcd=spec_etcd,
            checked_at=now,
            tls_dir=material.tls_dir,
            token_error=material.token_error,
        )
        self._entries[key] = entry
        if old is not None:
            log.info("etcd settings of %s/%s changed: new client", *key)
            await _close(old)
        return entry

    async def _material(self, namespace: str, spec: TransferGroupSpec) -> _Material:
        """Read the Secrets and resolve the endpoints; the TLS files go to a new 0700 directory."""
        digest = hashlib.sha256()
        extra: dict[str, Any] = {}
        tls_dir: tempfile.TemporaryDirectory[str] | None = None
        if spec.etcd.tls_secret_ref is not None:
            files = await asyncio.to_thread(self._read_secret, spec.etcd.tls_secret_ref.name, namespace)
            tls_dir = tempfile.TemporaryDirectory(prefix="weft-etcd-tls-")
            for secret_key, setting in _TLS_FILES:
                if secret_key in files:
                    path = Path(tls_dir.name) / secret_key
                    path.write_bytes(files[secret_key])
                    path.chmod(0o600)
                    extra[setting] = path
                    digest.update(
                        b"%s=%d:%s;" % (secret_key.encode(), len(files[secret_key]), files[secret_key])
                    )
        try:
            endpoints = await asyncio.to_thread(self._resolve, list(spec.etcd.endpoints))
            settings = EtcdSettings(endpoints=endpoints, **extra)
        except BaseException:
            if tls_dir is not None:
                tls_dir.cleanup()
            raise
        digest.update(repr(endpoints).encode())
        ref = spec.etcd.join_token_secret_ref
        token: bytes | None = None
        token_error: Exception | None = None
        try:
            data = await asyncio.to_thread(self._read_secret, ref.name, namespace)
        except Exception as exc:  # reported to whoever needs the token
            token_error = exc
        else:
            token = data.get(ref.key or "token", b"").strip() or None
        digest.update(b"token:" + (token or b"-"))
        return _Material(settings, token, token_error, digest.hexdigest(), tls_dir)

    async def drop(self, namespace: str, name: str) -> None:
        """Close and forget the group's client (the group is gone)."""
        self._locks.pop((namespace, name), None)
        entry = self._entries.pop((namespace, name), None)
        if entry is not None:
            await _close(entry)

    async def close(self) -> None:
        """Close every client (the operator stops)."""
        entries, self._entries = list(self._entries.values()), {}
        self._locks.clear()
        for entry in entries:
            await _close(entry)


async def _close(entry: _Entry) -> None:
    try:
        await entry.client.close()
    except Exception as exc:  # a client that cannot close cleanly is gone all the same
        log.warning("closing an etcd client: %s", exc)
    finally:
        if entry.tls_dir is not None:
            entry.tls_dir.cleanup()
