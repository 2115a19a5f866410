"""Expert weights held by this agent: pulled from a surviving replica, else from storage.

When a plan gives this agent an expert it does not hold, the bytes come, in order of
preference, from a member that hosted it in the previous plan and is still live (one fabric
READ of the region ``expert-<id>``), or from the storage tier when no replica survived. Either
way they are checked against the expert's digest before the region is registered under that
name, so peers can pull from it in turn. Experts the plan no longer gives this agent are
released one plan later (a newcomer may still be pulling from here).

Storage tiers (``--expert-source``):

* ``synthetic:BYTES``: deterministic pseudo-random weights per expert id, for tests, demos and
  benchmarks (the digest is known without a copy anywhere);
* ``dir:PATH``: ``PATH/expert-<id>.bin`` files with ``PATH/manifest.json`` mapping each expert
  id to its BLAKE2b-128 hex digest;
* ``kv:CONFIG``: the KV store (`weft.kvstore`) an ``lmcache-config.yaml`` names, POSIX files on
  a shared filesystem or S3 objects: chunks ``weft-experts/<id>`` and a manifest chunk
  ``weft-experts/manifest`` (JSON: id -> digest and size), written by `publish_experts`.
  Every agent of the group reads what another stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from weft import kvstore
from weft.fabric import errors as fabric_errors
from weft.fabric.agent import Agent
from weft.fabric.memory import Registration, RemoteRegion
from weft.fabric.types import Op
from weft.kvstore import KVStore

log = logging.getLogger(__name__)


def digest(data: Any) -> str:
    """BLAKE2b-128 of anything with the buffer protocol."""
    return hashlib.blake2b(memoryview(data).cast("B"), digest_size=16).hexdigest()


def region_name(expert: int) -> str:
    return f"expert-{expert}"


class ExpertSource:
    """The storage tier of expert weights."""

    def size(self, expert: int) -> int:
        raise NotImplementedError

    def digest(self, expert: int) -> str:
        raise NotImplementedError

    def load(self, expert: int) -> np.ndarray:
        raise NotImplementedError

    def check(self) -> None:
        """Fail now if the source cannot work at all (a missing directory or config file),
        rather than at the first expert it is asked for.

        Raises:
            ConfigError: naming the source and what is wrong with it.
        """

    @staticmethod
    def parse(spec: str) -> ExpertSource:
        kind, _, arg = spec.partition(":")
        if kind == "synthetic" and arg.isdigit() and int(arg) > 0:
            return SyntheticExperts(int(arg))
        if kind == "dir" and arg:
            return DirectoryExperts(Path(arg))
        if kind == "kv" and arg:
            return KVStoreExperts(Path(arg))
        raise fabric_errors.ConfigError(
            f"expert source {spec!r} is not synthetic:BYTES, dir:PATH or kv:LMCACHE_CONFIG"
        )


@dataclass
class SyntheticExperts(ExpertSource):
    nbytes: int
    _digests: dict[int, str] = field(default_factory=dict)

    def size(self, expert: int) -> int:
        return self.nbytes

    def load(self, expert: int) -> np.ndarray:
        return np.random.default_rng([0x57EF7, expert]).integers(0, 256, self.nbytes, dtype=np.uint8)

    def digest(self, expert: int) -> str:
        if expert not in self._digests:
            self._digests[expert] = digest(self.load(expert))
        return self._digests[expert]


@dataclass
class DirectoryExperts(ExpertSource):
    path: Path
    _manifest: dict[str, str] | None = None

    def _digests(self) -> dict[str, str]:
        if self._manifest is None:
            try:
                data = json.loads((self.path / "manifest.json").read_text())
            except (OSError, ValueError) as exc:
                raise fabric_errors.ConfigError(f"expert manifest in {self.path}: {exc}") from exc
            if not isinstance(data, dict):
                raise fabric_errors.ConfigError(f"expert manifest in {self.path} is not an object")
            self._manifest = {str(k): str(v) for k, v in data.items()}
        return self._manifest

    def check(self) -> None:
        if not self.path.is_dir():
            raise fabric_errors.ConfigError(f"expert source dir:{self.path}: not a directory")
        self._digests()

    def size(self, expert: int) -> int:
        return (self.path / f"expert-{expert}.bin").stat().st_size

    def digest(self, expert: int) -> str:
        try:
            return self._digests()[str(expert)]
        except KeyError:
            raise fabric_errors.ConfigError(f"expert {expert} is not in {self.path}/manifest.json") from None

    def load(self, expert: int) -> np.ndarray:
        return np.fromfile(self.path / f"expert-{expert}.bin", dtype=np.uint8)


MANIFEST_KEY = "weft-experts/manifest"


def expert_key(expert: int) -> str:
    return f"weft-experts/{expert}"


def publish_experts(store: KVStore, experts: Mapping[int, Any]) -> dict[int, str]:
    """Write expert weights and their manifest into a KV store; returns id -> digest."""
    digests = {e: digest(w) for e, w in experts.items()}
    store.put_many([(expert_key(e), w) for e, w in experts.items()])
    manifest = {str(e): {"digest": digests[e], "size": memoryview(w).nbytes} for e, w in experts.items()}
    store.put(MANIFEST_KEY, json.dumps(manifest, sort_keys=True).encode())  # last: it names what is there
    return digests


class KVStoreExperts(ExpertSource):
    """Expert weights in a KV store (``kv:LMCACHE_CONFIG``), shared by the group's agents."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self._store: KVStore | None = None
        self._manifest: dict[str, dict[str, Any]] | None = None

    def check(self) -> None:
        try:
            kvstore.load_lmcache_config(self.config)
        except fabric_errors.ConfigError as exc:
            raise fabric_errors.ConfigError(f"expert source kv:{self.config}: {exc}") from None

    def _open(self) -> KVStore:
        if self._store is None:
            self._store = KVStore.from_lmcache_config(self.config)
        return self._store

    def _entry(self, expert: int) -> dict[str, Any]:
        if self._manifest is None:
            raw = self._open().get(MANIFEST_KEY)
            if raw is None:
                raise fabric_errors.ConfigError(
                    f"no expert manifest ({MANIFEST_KEY}) in the store of {self.config}"
                )
            try:
                data = json.loads(raw)
            except ValueError as exc:
                raise fabric_errors.ConfigError(
                    f"expert manifest in the store of {self.config}: {exc}"
                ) from None
            self._manifest = data if isinstance(data, dict) else {}
        try:
            entry = self._manifest[str(expert)]
            return {"digest": str(entry["digest"]), "size": int(entry["size"])}
        except (KeyError, TypeError, ValueError):
            self._manifest = None  # re-read next time: a publisher may have added it since
            raise fabric_errors.ConfigError(f"expert {expert} is not in the store of {self.config}") from None

    def size(self, expert: int) -> int:
        return int(self._entry(expert)["size"])

    def digest(self, expert: int) -> str:
        return str(self._entry(expert)["digest"])

    def load(self, expert: int) -> np.ndarray:
        out = np.empty(self.size(expert), np.uint8)
        if not self._open().get(expert_key(expert), into=out):
            raise fabric_errors.StorageError(
                f"expert {expert} is missing or corrupt in the store of {self.config}"
            )
        return out

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


@dataclass(frozen=True)
class Pulled:
    expert: int
    source: str  # a member name, or "storage"
    nbytes: int
    seconds: float


class ExpertHolder:
    """The experts this agent holds, as registered regions ``expert-<id>``."""

    def __init__(self, agent: Agent, source: ExpertSource, timeout: float = 30.0) -> None:
        self.agent = agent
        self.source = source
        self.timeout = timeout
        self.held: dict[int, Registration] = {}
        self._digests: dict[int, str] = {}  # checked at arrival; the regions are read-only
        self.pulled: list[Pulled] = []
        self.failed_pulls = 0

    async def ensure(self, experts: Iterable[int], sources: Mapping[int, Sequence[str]]) -> list[Pulled]:
        """Hold every expert in `experts`; `sources[e]` lists members to try first, in order."""
        out = []
        for e in sorted(set(experts) - set(self.held)):
            out.append(await self._get(e, sources.get(e, ())))
        self.pulled.extend(out)
        return out

    async def _get(self, e: int, peers: Sequence[str]) -> Pulled:
        loop = asyncio.get_running_loop()
        want = self.source.digest(e)
        size = self.source.size(e)
        for peer in peers:
            started = loop.time()
            reg = self.agent.alloc(size)
            try:
                remote = await asyncio.to_thread(self.agent.remote, peer, region_name(e), timeout=5.0)
                if remote.size != size:
                    raise fabric_errors.InvalidDescriptorError(
                        f"{peer} holds {remote.size} bytes, not {size}"
                    )
                await asyncio.to_thread(self._read, reg, peer, remote)
                got = digest(reg.buffer)
                if got != want:
                    raise fabric_errors.TransferError(f"expert {e} from {peer}: digest {got} is not {want}")
            except fabric_errors.WeftError as exc:
                reg.release()
                self.failed_pulls += 1
                log.info("%s: pulling expert %d from %s failed: %s", self.agent.name, e, peer, exc)
                continue
            self._keep(e, reg, want)
            return Pulled(e, peer, size, loop.time() - started)
        started = loop.time()
        data = await asyncio.to_thread(self.source.load, e)
        if digest(data) != want:
            raise fabric_errors.TransferError(f"expert {e} in the storage tier does not match its digest")
        reg = self.agent.alloc(size)
        reg.buffer[:] = data
        self._keep(e, reg, want)
        return Pulled(e, "storage", size, loop.time() - started)

    def _read(self, reg: Registration, peer: str, remote: RemoteRegion) -> None:
        self.agent.transfer(Op.READ, reg.descs(), peer, remote.descs(), timeout=self.timeout).wait()

    def _keep(self, e: int, reg: Registration, checked: str) -> None:
        buf = reg.buffer
        reg.release()  # alloc registered it unnamed: register the same bytes under the expert's name
        self.held[e] = self.agent.register(buf, region_name(e), readonly=True)
        self._digests[e] = checked

    def release(self, experts: Iterable[int]) -> None:
        for e in experts:
            reg = self.held.pop(e, None)
            if reg is not None:
                reg.release()
                self._digests.pop(e, None)

    def view(self, expert: int) -> memoryview:
        """A read-only byte view of a held expert's weights (valid until it is released)."""
        return memoryview(self.held[expert].buffer).cast("B").toreadonly()

    def adopt(self, expert: int, weights: Any) -> None:
        """Hold weights the engine already has (loaded from its checkpoint) as the expert's
        region, so peers can pull from here; checked against the source's digest first.

        Raises:
            TransferError: the bytes are not the expert's (wrong digest).
            ConfigError: the source does not know the expert.
        """
        want = self.source.digest(expert)
        got = digest(weights)
        if got != want:
            raise fabric_errors.TransferError(f"expert {expert}: digest {got} is not {want}")
        old = self.held.pop(expert, None)
        if old is not None:
            old.release()
        self.held[expert] = self.agent.register(weights, region_name(expert), readonly=True)
        self._digests[expert] = want

    def digests(self) -> dict[int, str]:
        """Expert -> the digest its bytes were checked against when they arrived."""
        return dict(self._digests)
