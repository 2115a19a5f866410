"""The one module that talks to etcd: a small asyncio client on etcd's v3 gRPC API.

Why not a ready-made client (DEVELOPMENT.md has the measurements): python-etcd3 fails to
import with protobuf >= 4 unless the whole process switches to the slow pure-Python protobuf;
aetcd imports cleanly but opens only plaintext channels, never renews an auth token and
ends a watch for good when etcd restarts. So weft takes aetcd's generated stubs (protobuf 4+
compatible, nothing process-wide) and drives them here: TLS with client certificates,
user/password with token renewal, one long-lived lease keep-alive stream, watches that report
a broken stream as `EtcdUnavailableError` so the caller re-reads and watches on, a deadline on
every request, and endpoint rotation.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import grpc
import grpc.aio
from aetcd import rpc

from weft.api.settings import EtcdSettings
from weft.membership import errors

log = logging.getLogger(__name__)

T = TypeVar("T")

# gRPC's default reconnect backoff grows to 120 s; an agent must see etcd again within a
# second of it coming back. Keep-alive pings find a dead connection that sent no RST; etcd
# refuses pings closer than its --grpc-keepalive-min-time (5 s).
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.max_receive_message_length", 64 << 20),
]


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass(frozen=True, slots=True)
class Event:
    kind: Literal["put", "delete"]
    kv: KeyValue
    prev: KeyValue | None
    revision: int


def _kv(m: Any) -> KeyValue:
    return KeyValue(
        key=bytes(m.key),
        value=bytes(m.value),
        create_revision=int(m.create_revision),
        mod_revision=int(m.mod_revision),
        version=int(m.version),
        lease=int(m.lease),
    )


def prefix_end(prefix: bytes) -> bytes:
    """The etcd ``range_end`` that selects every key starting with `prefix`."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def _read_file(path: Any) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise errors.EtcdError(f"cannot read etcd TLS file {path}: {exc}") from exc


class Etcd:
    """An etcd v3 client bound to the running event loop (create and use it in one loop).

    Args:
        settings: endpoints, TLS files, credentials, request deadline.
    """

    def __init__(self, settings: EtcdSettings) -> None:
        self.settings = settings
        self._targets = settings.targets()
        self._target = 0
        self._channel: grpc.aio.Channel | None = None
        self._metadata: tuple[tuple[str, str], ...] | None = None
        self._kv: Any = None
        self._lease: Any = None
        self._watch: Any = None
        self._keepalive: Any = None
        self._keepalive_lock = asyncio.Lock()
        self._connect_lock = asyncio.Lock()
        self._closed = False

    @property
    def endpoint(self) -> str:
        return self.settings.endpoints[self._target]

    # -- connection ------------------------------------------------------------------------
    def _open_channel(self) -> grpc.aio.Channel:
        target = self._targets[self._target]
        if not self.settings.secure:
            return grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
        s = self.settings
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read_file(s.ca_file) if s.ca_file else None,
            private_key=_read_file(s.key_file) if s.key_file else None,
            certificate_chain=_read_file(s.cert_file) if s.cert_file else None,
        )
        return grpc.aio.secure_channel(target, creds, options=_CHANNEL_OPTIONS)

    async def _connect(self) -> None:
        if self._closed:
            raise errors.EtcdError("etcd client is closed")
        if self._channel is not None:
            return
        async with self._connect_lock:
            if self._channel is not None:
                return
            channel = self._open_channel()
            self._kv = rpc.KVStub(channel)
            self._lease = rpc.LeaseStub(channel)
            self._watch = rpc.WatchStub(channel)
            self._channel = channel
            if self.settings.username is not None:
                await self._authenticate()

    async def _authenticate(self) -> None:
        s = self.settings
        assert s.username is not None and s.password is not None and self._channel is not None
        request = rpc.AuthenticateRequest(name=s.username, password=s.password.get_secret_value())
        try:
            reply = await rpc.AuthStub(self._channel).Authenticate(request, timeout=s.request_timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._map(exc, "authenticate") from None
        self._metadata = (("token", reply.token),)

    async def _drop_channel(self) -> None:
        channel, self._channel = self._channel, None
        self._keepalive = None
        self._metadata = None
        if channel is not None:
            await channel.close(grace=None)

    async def _rotate(self) -> None:
        """After a failure with several endpoints: the next request goes to the next one."""
        if len(self._targets) > 1:
            self._target = (self._target + 1) % len(self._targets)
            log.info("etcd: switching to %s", self.endpoint)
            await self._drop_channel()

    def _map(self, exc: grpc.aio.AioRpcError, what: str) -> errors.EtcdError:
        code, details = exc.code(), exc.details() or ""
        text = f"etcd {what} at {self.endpoint}: {code.name} {details}".strip()
        if code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.CANCELLED,
        ):
            return errors.EtcdUnavailableError(text)
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return errors.EtcdAuthError(text)
        # etcd 3.4 answers a wrong password or a missing user with InvalidArgument
        if code == grpc.StatusCode.INVALID_ARGUMENT and (
            "authentication" in details or "user name" in details
        ):
            return errors.EtcdAuthError(text)
        return errors.EtcdError(text)

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """One request with the deadline; renews an expired auth token once; maps errors."""
        await self._connect()
        for attempt in range(2):
            try:
                return await asyncio.wait_for(fn(), self.settings.request_timeout)
            except TimeoutError:
                await self._rotate()
                raise errors.EtcdUnavailableError(
                    f"etcd {what} at {self.endpoint}: no answer within {self.settings.request_timeout} s"
                ) from None
            except grpc.aio.AioRpcError as exc:
                mapped = self._map(exc, what)
                if (
                    attempt == 0
                    and isinstance(mapped, errors.EtcdAuthError)
                    and self.settings.username is not None
                    and "token" in (exc.details() or "")
                ):
                    await self._authenticate()  # simple tokens expire (--auth-token-ttl)
                    continue
                if isinstance(mapped, errors.EtcdUnavailableError):
                    await self._rotate()
                raise mapped from None
        raise AssertionError("unreachable")

    async def close(self) -> None:
        self._closed = True
        await self._drop_channel()

    async def __aenter__(self) -> Etcd:
        await self._connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- key/value -------------------------------------------------------------------------
    async def get(self, key: bytes) -> KeyValue | None:
        reply = await self._call(
            "get", lambda: self._kv.Range(rpc.RangeRequest(key=key), metadata=self._metadata)
        )
        return _kv(reply.kvs[0]) if reply.kvs else None

    async def get_prefix(self, prefix: bytes) -> tuple[int, list[KeyValue]]:
        """Every key under `prefix`, and the revision the answer is consistent at."""
        request = rpc.RangeRequest(key=prefix, range_end=prefix_end(prefix))
        reply = await self._call("get", lambda: self._kv.Range(request, metadata=self._metadata))
        return int(reply.header.revision), [_kv(m) for m in reply.kvs]

    async def revision(self) -> int:
        """The store's current revision."""
        request = rpc.RangeRequest(key=b"\0", count_only=True)
        reply = await self._call("get", lambda: self._kv.Range(request, metadata=self._metadata))
        return int(reply.header.revision)

    async def put(self, key: bytes, value: bytes, *, lease: int = 0) -> int:
        """Write `key`; returns the revision of the write."""
        request = rpc.PutRequest(key=key, value=value, lease=lease)
        reply = await self._call("put", lambda: self._kv.Put(request, metadata=self._metadata))
        return int(reply.header.revision)

    async def delete(self, key: bytes) -> bool:
        request = rpc.DeleteRangeRequest(key=key)
        reply = await self._call("delete", lambda: self._kv.DeleteRange(request, metadata=self._metadata))
        return int(reply.deleted) > 0

    async def delete_prefix(self, prefix: bytes) -> int:
        request = rpc.DeleteRangeRequest(key=prefix, range_end=prefix_end(prefix))
        reply = await self._call("delete", lambda: self._kv.DeleteRange(request, metadata=self._metadata))
        return int(reply.deleted)

    async def _txn(self, what: str, compare: Any, success: list[Any]) -> tuple[bool, int]:
        request = rpc.TxnRequest(compare=[compare], success=success, failure=[])
        reply = await self._call(what, lambda: self._kv.Txn(request, metadata=self._metadata))
        return bool(reply.succeeded), int(reply.header.revision)

    async def create(self, key: bytes, value: bytes, *, lease: int = 0) -> tuple[bool, int]:
        """Write `key` only if it does not exist. Returns (created, revision)."""
        compare = rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE, key=key, create_revision=0)
        put = rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease))
        return await self._txn("create", compare, [put])

    async def replace(
        self, key: bytes, value: bytes, *, mod_revision: int, lease: int = 0
    ) -> tuple[bool, int]:
        """Compare-and-swap: write `key` only if its last write was at `mod_revision`.

        ``mod_revision=0`` means "only if absent". Returns (written, revision).
        """
        compare = rpc.Compare(
            result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, key=key, mod_revision=mod_revision
        )
        put = rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease))
        return await self._txn("compare-and-swap", compare, [put])

    async def delete_if(self, key: bytes, *, mod_revision: int) -> bool:
        """Delete `key` only if its last write was at `mod_revision`."""
        compare = rpc.Compare(
            result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, key=key, mod_revision=mod_revision
        )
        delete = rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))
        ok, _ = await self._txn("compare-and-delete", compare, [delete])
        return ok

    # -- leases ----------------------------------------------------------------------------
    async def grant(self, ttl: int) -> tuple[int, int]:
        """A new lease; returns (lease id, granted TTL in seconds)."""
        request = rpc.LeaseGrantRequest(TTL=ttl)
        reply = await self._call(
            "lease grant", lambda: self._lease.LeaseGrant(request, metadata=self._metadata)
        )
        if reply.error:
            raise errors.EtcdError(f"etcd lease grant: {reply.error}")
        return int(reply.ID), int(reply.TTL)

    async def keepalive(self, lease_id: int) -> int:
        """Refresh a lease over one long-lived stream. Returns its TTL; 0 means it is gone."""

        async def once() -> int:
            if self._keepalive is None:
                self._keepalive = self._lease.LeaseKeepAlive(metadata=self._metadata)
            call = self._keepalive
            try:
                await call.write(rpc.LeaseKeepAliveRequest(ID=lease_id))
                reply = await call.read()
            except asyncio.InvalidStateError:  # the stream ended (etcd went away) before our write
                self._keepalive = None
                raise errors.EtcdUnavailableError(
                    f"etcd at {self.endpoint} ended the keep-alive stream"
                ) from None
            except BaseException:
                self._keepalive = None
                call.cancel()
                raise
            if reply is grpc.aio.EOF:
                self._keepalive = None
                raise errors.EtcdUnavailableError(f"etcd at {self.endpoint} closed the keep-alive stream")
            return int(reply.TTL)

        async with self._keepalive_lock:
            return await self._call("lease keep-alive", once)

    async def revoke(self, lease_id: int) -> None:
        """Revoke a lease (its keys are deleted at once). A lease already gone is fine."""
        request = rpc.LeaseRevokeRequest(ID=lease_id)
        try:
            await self._call(
                "lease revoke", lambda: self._lease.LeaseRevoke(request, metadata=self._metadata)
            )
        except errors.EtcdError as exc:
            if "not found" not in str(exc):
                raise

    async def time_to_live(self, lease_id: int) -> int:
        """Seconds the lease has left (whole seconds, as etcd reports them); -1 if it is gone."""
        request = rpc.LeaseTimeToLiveRequest(ID=lease_id)
        reply = await self._call(
            "lease ttl", lambda: self._lease.LeaseTimeToLive(request, metadata=self._metadata)
        )
        return int(reply.TTL)

    # -- watch -----------------------------------------------------------------------------
    async def watch_prefix(self, prefix: bytes, start_revision: int) -> AsyncIterator[list[Event]]:
        """Events under `prefix` from `start_revision` on, one list per etcd response.

        The first item is an empty list once etcd has confirmed the watch (so a caller knows
        from when on it is covered). Raises `EtcdUnavailableError` when the stream breaks and
        `EtcdCompactedError` when `start_revision` is no longer in etcd's history; either way
        the caller re-reads the prefix and watches again from the revision of that read.
        """
        await self._connect()
        call = self._watch.Watch(metadata=self._metadata)
        create = rpc.WatchCreateRequest(
            key=prefix, range_end=prefix_end(prefix), start_revision=start_revision, prev_kv=True
        )
        try:
            try:
                await asyncio.wait_for(
                    call.write(rpc.WatchRequest(create_request=create)), self.settings.request_timeout
                )
                first = await asyncio.wait_for(call.read(), self.settings.request_timeout)
            except TimeoutError:
                await self._rotate()
                raise errors.EtcdUnavailableError(
                    f"etcd watch at {self.endpoint}: not confirmed in time"
                ) from None
            self._check_watch(first)
            yield [] if not first.events else self._events(first)
            while True:
                reply = await call.read()  # a stream: a dead connection ends it via gRPC keep-alive
                self._check_watch(reply)
                if reply.events:
                    yield self._events(reply)
        except grpc.aio.AioRpcError as exc:
            mapped = self._map(exc, "watch")
            if isinstance(mapped, errors.EtcdUnavailableError):
                await self._rotate()
            raise mapped from None
        finally:
            call.cancel()

    def _check_watch(self, reply: Any) -> None:
        if reply is grpc.aio.EOF:
            raise errors.EtcdUnavailableError(f"etcd at {self.endpoint} ended the watch stream")
        if reply.compact_revision:
            raise errors.EtcdCompactedError(
                f"etcd compacted history up to revision {reply.compact_revision}", int(reply.compact_revision)
            )
        if reply.canceled:
            raise errors.EtcdError(f"etcd cancelled the watch: {reply.cancel_reason or 'no reason given'}")

    @staticmethod
    def _events(reply: Any) -> list[Event]:
        revision = int(reply.header.revision)
        out = []
        for e in reply.events:
            kind: Literal["put", "delete"] = "delete" if e.type == rpc.Event.DELETE else "put"
            prev = _kv(e.prev_kv) if e.HasField("prev_kv") else None
            out.append(Event(kind, _kv(e.kv), prev, revision))
        return out
