"""The `obj` storage backend: OBJ memory, one S3 object per region, through obstore.

The client is `weft.fabric.objstore.S3Client` (chosen by measurement, decision 007), made
once per backend from NIXL's OBJ parameters (`weft.api.storage.ObjParams`: ``bucket``,
``endpoint_override``, ``scheme``, ``access_key``, ``secret_key``, ``session_token``,
``region``, ``ca_bundle``, ``use_virtual_addressing``, ``req_checksum``, and weft's
``prefix``), plus ``workers`` (requests in flight at once; default 16) and ``timeout_s``
(deadline of one request; default 30). Other keys are ignored with one log line naming
them, as NIXL's plugins ignore what they do not know.

S3 has no partial writes, so a WRITE replaces the whole object: its descriptors must cover
the object from offset 0 without gaps (in any order; several are gathered into one body, one
descriptor goes up with no copy). A READ fetches each descriptor's byte range (in parallel
for several) into the caller's buffers; a range past the object's end fails. An object
appears whole or not at all: a writer killed mid-PUT leaves the old object (or none).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pydantic

from weft.api.storage import ObjParams
from weft.api.vocab import StorageBackend
from weft.fabric import errors, storage
from weft.fabric.backends import posix
from weft.fabric.objstore import S3Client
from weft.fabric.transfer import Joint
from weft.fabric.types import MemoryKind, Op

if TYPE_CHECKING:
    from weft.fabric.backend import BackendHost
    from weft.fabric.memory import DescList
    from weft.fabric.transfer import Transfer

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ObjPlan:
    op: Op
    key: str
    views: list[memoryview]  # local buffers, ordered by object offset for a WRITE
    starts: list[int]
    lengths: list[int]
    total: int
    stage: Any


class ObjBackend:
    kind = StorageBackend.OBJ
    memory = MemoryKind.OBJ

    def __init__(self, host: BackendHost, params: Mapping[str, Any]) -> None:
        ours = {k: params[k] for k in ("workers", "timeout_s", "staging_bytes") if k in params}
        theirs = {k: v for k, v in params.items() if k in ObjParams.model_fields or k == "endpoint"}
        ignored = sorted(set(params) - set(ours) - set(theirs))
        if ignored:
            log.info("agent %s: the obj backend ignores parameters %s", host.name, ignored)
        try:
            parsed = ObjParams.model_validate(theirs)
        except pydantic.ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "parameters"
            raise errors.ConfigError(f"obj backend: {where}: {first['msg']}") from None
        timeout = float(posix.count(ours, "timeout_s", 30))
        self.host = host
        self.staging_bytes = posix.count(ours, "staging_bytes", 256 << 20)
        self.client = S3Client.from_params(parsed, timeout_s=timeout)
        self.client.check_bucket()
        self._pool = ThreadPoolExecutor(
            max_workers=posix.count(ours, "workers", 16), thread_name_prefix=f"weft-obj {host.name}"
        )
        self._closed = False

    def plan(self, op: Op, local: DescList, store: DescList) -> ObjPlan:
        region = self.host.local_region(local)
        obj_region = self.host.local_region(store)
        spec = obj_region.keepalive
        if not isinstance(spec, storage.ObjectRegion):
            raise errors.InvalidDescriptorError(f"region {obj_region.label} is not an OBJ region")
        if len(local) != len(store):
            raise errors.InvalidDescriptorError(
                f"local and object descriptors must match one to one ({len(local)} and {len(store)})"
            )
        starts, lengths = store.offsets.tolist(), store.lengths.tolist()
        staged: list[Any] = []
        views = posix.host_views(region, local, lengths, self.staging_bytes, staged, "obj", "OBJ")
        stage = staged[0] if staged else None
        if op is Op.WRITE:
            order = sorted(range(len(starts)), key=starts.__getitem__)
            at = 0
            for i in order:
                if starts[i] != at:
                    raise errors.InvalidDescriptorError(
                        f"a WRITE replaces the whole object {spec.key!r} (S3 has no partial writes): "
                        f"its descriptors must cover it from offset 0 without gaps; offset {at} is "
                        f"{'missing' if starts[i] > at else 'written twice'}"
                    )
                at += lengths[i]
            views = [views[i] for i in order]
        return ObjPlan(op, spec.key, views, starts, lengths, local.total, stage)

    def plan_batch(self, op: Op, pairs: list[tuple[DescList, DescList]]) -> list[ObjPlan]:
        return [self.plan(op, local, store) for local, store in pairs]

    def post(self, plan: ObjPlan | list[ObjPlan], transfer: Transfer, notify: bytes | None) -> None:
        """Queue each object's request on the pool; the transfer ends when all have."""
        if self._closed:
            raise errors.AgentClosedError(f"agent {self.host.name!r}: obj backend closed")
        plans = plan if isinstance(plan, list) else [plan]
        for p in plans:
            if p.stage is not None and p.op is Op.WRITE:
                posix.stage_out(self.host, [p.stage])
        joint = Joint(len(plans), functools.partial(self._end, transfer, notify))
        for p in plans:
            self._pool.submit(functools.partial(self._run, p, transfer, joint))

    def post_batch(self, items: list[tuple[ObjPlan, Transfer, bytes | None]]) -> None:
        for plan, transfer, notify in items:  # each request runs on the pool already
            try:
                self.post(plan, transfer, notify)
            except errors.WeftError as exc:
                transfer.complete(exc)

    def _run(self, plan: ObjPlan, transfer: Transfer, joint: Joint) -> None:
        err: errors.WeftError | None = None
        try:
            if transfer.done():  # its deadline passed (or it was released) while it queued
                return
            if plan.op is Op.WRITE:
                body: Any = plan.views[0] if len(plan.views) == 1 else b"".join(plan.views)
                self.client.put(plan.key, body)
            else:
                self._read(plan)
                if plan.stage is not None:
                    posix.stage_in(self.host, [plan.stage])
        except errors.WeftError as exc:
            err = exc
        finally:
            joint.done(err)

    def _end(self, transfer: Transfer, notify: bytes | None, err: errors.WeftError | None) -> None:
        if transfer.complete(err) and err is None and notify is not None:
            self.host.deliver(self.host.name, notify)

    def _read(self, plan: ObjPlan) -> None:
        if len(plan.starts) == 1:
            one = self.client.get_range(plan.key, plan.starts[0], plan.lengths[0])
            got = None if one is None else [one]
        else:
            got = self.client.get_ranges(plan.key, plan.starts, plan.lengths)
        if got is None:
            raise errors.StorageError(f"object {plan.key!r} does not exist in bucket {self.client.bucket!r}")
        for i, (view, data) in enumerate(zip(plan.views, got, strict=True)):
            chunk = memoryview(data)
            if chunk.nbytes != view.nbytes:
                raise errors.StorageError(
                    f"object {plan.key!r} ends before descriptor {i} (offset {plan.starts[i]}, "
                    f"length {plan.lengths[i]}): got {chunk.nbytes} bytes"
                )
            view[:] = chunk

    def query(self, spec: storage.FileRegion | storage.ObjectRegion) -> storage.StorageInfo | None:
        if not isinstance(spec, storage.ObjectRegion):
            raise errors.InvalidDescriptorError("the obj backend answers for ObjectRegion, not FileRegion")
        size = self.client.size(spec.key)
        return None if size is None else storage.StorageInfo(size=size)

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=True)
