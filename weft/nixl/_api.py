"""NIXL 1.5's ``nixl._api`` over weft's fabric: ``nixl_agent`` and its handles.

NIXL addresses memory by absolute (addr, len, devId) descriptors that may span several
registrations (vLLM registers one region per layer); a weft `DescList` covers one region by
offsets. So the shim keeps a table of its own registrations and reads each peer's regions
from its metadata, maps every descriptor to (region, offset) when a list is prepared
(``prep_xfer_dlist``), and at ``make_prepped_xfer`` groups the chosen descriptors by (local
region, remote region) into weft prepared transfers, built once. ``transfer`` posts them;
``check_xfer_state`` only reads state (never blocks): DONE when every part is DONE, ERR as
soon as one fails. With one part the notification rides on the weft transfer; with several,
the parts go without one and a per-agent notifier thread sends it once all are DONE, then
marks the handle DONE (so no thread of the caller ever waits on a socket for it).

Security and liveness are weft's: metadata is weft's signed record (group secret from
``WEFT_SECRET`` / ``WEFT_SECRET_FILE`` or `weft.nixl.install(config=...)`), a peer that dies
fails its transfers with `PeerLostError` (the handle reads "ERR"), and every transfer has
weft's deadline.

Where NIXL is odd and clients depend on it, the shim matches it (each place says so):
``add_remote_agent`` returns the name as bytes, ``get_xfer_descs``/``get_reg_descs`` log and
return None on bad input, ``remove_remote_agent`` of an unknown name does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from weft import fabric
from weft.fabric import Agent, AgentConfig, Backend, Op, TransferState
from weft.nixl import _bindings as nixlBind
from weft.nixl import _convert, _exchange
from weft.nixl._memory import _MEM, Memory, _Table
from weft.nixl._metadata import Metadata

logger = logging.getLogger(__name__)

DEFAULT_COMM_PORT = nixlBind.DEFAULT_COMM_PORT
MIN_SECRET_BYTES = 16

#: NIXL plugin names this shim offers, and what each means in weft.
PLUGINS = ("OBJ", "POSIX", "UCX")
#: weft data paths for NIXL's "UCX": the best DRAM path available, in order.
UCX_PATHS: tuple[Backend, ...] = (Backend.LOCAL, Backend.UCX, Backend.TCP)
_base_config: AgentConfig | None = None


def set_base_config(config: AgentConfig | None) -> None:
    """The weft settings every new ``nixl_agent`` starts from (secret, hosts, timeouts)."""
    global _base_config  # noqa: PLW0603 (one process-wide default, set by install())
    _base_config = config


def _env_secret() -> bytes | None:
    """``WEFT_SECRET`` (the join token) or the file named by ``WEFT_SECRET_FILE``."""
    token = os.environ.get("WEFT_SECRET")
    path = os.environ.get("WEFT_SECRET_FILE")
    if token is not None and path is not None:
        raise nixlBind.nixlInvalidParamError("set WEFT_SECRET or WEFT_SECRET_FILE, not both")
    if path is not None:
        try:
            token_b = Path(path).read_bytes()[: 64 << 10].strip()
        except OSError as exc:
            raise nixlBind.nixlInvalidParamError(f"WEFT_SECRET_FILE: cannot read {path}: {exc}") from exc
    elif token is not None:
        token_b = token.encode()
    else:
        return None
    if len(token_b) < MIN_SECRET_BYTES:
        raise nixlBind.nixlInvalidParamError(f"the join token must be at least {MIN_SECRET_BYTES} bytes")
    return token_b


def _weft_config(paths: Sequence[Backend]) -> AgentConfig:
    base = _base_config
    if base is None:
        env = os.environ
        base = AgentConfig(
            paths,
            secret=_env_secret(),
            listen_host=env.get("WEFT_LISTEN_HOST", "127.0.0.1"),
            advertise_host=env.get("WEFT_ADVERTISE_HOST"),
        )
    return base.replace(backends=tuple(paths))


# -- handles (NIXL's classes, same slots plus the shim's state) ---------------------------


class nixl_prepped_dlist_handle:
    """A prepared descriptor list (``prep_xfer_dlist``); ``release()`` frees it."""

    __slots__ = ("_agent", "_handle", "_released", "_x")

    def __init__(self, agent: Any, value: int, x: Any = None) -> None:
        self._handle = int(value)
        self._agent = agent
        self._released = False
        self._x = x

    def __repr__(self) -> str:
        return f"nixl_prepped_dlist_handle(0x{self._handle:x}, released={self._released})"

    def release(self) -> None:
        if not self._released:
            self._agent.releasedDlistH(self._handle)
            self._released = True
            self._x = None


class nixl_xfer_handle:
    """A transfer request; ``release()`` cancels it if still in flight and frees it."""

    __slots__ = ("_agent", "_handle", "_released", "_x")

    def __init__(self, agent: Any, value: int, x: Any = None) -> None:
        self._handle = int(value)
        self._agent = agent
        self._released = False
        self._x = x

    def __repr__(self) -> str:
        return f"nixl_xfer_handle(0x{self._handle:x}, released={self._released})"

    def release(self) -> None:
        if not self._released:
            self._agent.releaseXferReq(self._handle)
            self._released = True

    def __del__(self) -> None:
        if not getattr(self, "_released", True):
            with contextlib.suppress(Exception):
                self.release()


nixl_backend_handle = int


class nixl_thread_sync_t(Enum):
    """NIXL's thread synchronisation modes. weft's agent is thread-safe in every mode."""

    NIXL_THREAD_SYNC_NONE = nixlBind.NIXL_THREAD_SYNC_NONE
    NIXL_THREAD_SYNC_STRICT = nixlBind.NIXL_THREAD_SYNC_STRICT
    NIXL_THREAD_SYNC_RW = nixlBind.NIXL_THREAD_SYNC_RW
    NIXL_THREAD_SYNC_DEFAULT = nixlBind.NIXL_THREAD_SYNC_DEFAULT


class nixl_agent_config:
    """NIXL's agent configuration, same signature and defaults.

    Args:
        enable_prog_thread: accepted; weft's fabric always completes transfers on its threads.
        enable_listen_thread: run the metadata listener (``send_local_metadata`` targets).
        listen_port: the listener's port.
        capture_telemetry: keep per-transfer telemetry (``get_xfer_telemetry``).
        num_threads: accepted (weft sizes its own workers).
        backends: NIXL plugin names ("UCX", "POSIX", "OBJ") or weft's ("local", "tcp", "ucx").
        sync_mode: a `nixl_thread_sync_t` or None.
    """

    def __init__(
        self,
        enable_prog_thread: bool = True,
        enable_listen_thread: bool = False,
        listen_port: int = DEFAULT_COMM_PORT,
        capture_telemetry: bool = False,
        num_threads: int = 0,
        backends: list[str] = ["UCX"],  # noqa: B006 (NIXL's default, never mutated here)
        sync_mode: nixl_thread_sync_t | None = None,
    ) -> None:
        self.backends = backends
        self.enable_pthread = enable_prog_thread
        self.enable_listen = enable_listen_thread
        self.port = listen_port
        self.capture_telemetry = capture_telemetry
        self.num_threads = num_threads
        if sync_mode is not None and not isinstance(sync_mode, nixl_thread_sync_t):
            raise TypeError(f"sync_mode must be a nixl_thread_sync_t (got {type(sync_mode).__name__!r})")
        self.sync_mode = sync_mode


# -- the shim's internals ----------------------------------------------------------------

_STATE = {TransferState.DONE: "DONE", TransferState.POSTED: "PROC", TransferState.ERROR: "ERR"}


class _Prepped:
    """A prepared descriptor list: every descriptor mapped to (region index, offset)."""

    __slots__ = ("addrs", "lengths", "loopback", "offsets", "peer", "reg_idx", "regs", "seg")

    def __init__(
        self,
        peer: str | None,
        loopback: bool,
        seg: nixlBind.nixl_mem_t,
        regs: list[Any],
        reg_idx: npt.NDArray[np.int64],
        offsets: npt.NDArray[np.uint64],
        lengths: npt.NDArray[np.uint64],
        addrs: npt.NDArray[np.uint64],
    ) -> None:
        self.peer = peer
        self.loopback = loopback
        self.seg = seg
        self.regs = regs
        self.reg_idx = reg_idx
        self.offsets = offsets
        self.lengths = lengths
        self.addrs = addrs


class _Xfer:
    """One NIXL transfer request: weft prepared parts (and same-process copies), one state."""

    __slots__ = (
        "__weakref__",
        "_done_parts",
        "_lock",
        "backend",
        "copies",
        "error",
        "nbytes",
        "ndescs",
        "notif",
        "owned",
        "parts",
        "peer",
        "posted",
        "released",
        "shim",
        "status",
        "t_end",
        "t_post",
        "t_posted",
        "t_start",
    )

    def __init__(self, shim: _Shim, peer: str, notif: bytes, backend: str) -> None:
        self.shim = shim
        self.peer = peer
        self.notif = notif
        self.backend = backend
        self.parts: list[fabric.PreparedTransfer] = []
        self.copies: list[tuple[int, int, int]] = []
        self.posted: list[fabric.Transfer] = []
        self.owned: list[nixl_prepped_dlist_handle] = []
        self.status: str | None = None  # None: never posted; else DONE / PROC / ERR
        self.error: BaseException | None = None
        self.nbytes = 0
        self.ndescs = 0
        self._done_parts = 0
        self._lock = threading.Lock()
        self.released = False
        self.t_start = self.t_post = self.t_posted = self.t_end = 0.0

    def post(self, notif: bytes) -> str:
        if self.status == "PROC" and self.state() == "PROC":
            raise nixlBind.nixlRepostActiveError("the transfer is still in progress")
        msg = notif or self.notif
        self.error = None
        self.posted = []
        self.t_start = time.time()
        self.t_post = time.monotonic()
        for dst, src, n in self.copies:
            ctypes.memmove(dst, src, n)
        parts = self.parts
        try:
            if len(parts) == 1:
                # the notification rides on the one weft transfer, after its bytes
                t = parts[0].post(notify=msg) if msg != self.notif else parts[0].post()
                self.posted = [t]
                self.status = "PROC"
                self.t_posted = time.monotonic()
                return self.state()
            self._done_parts = 0
            self.status = "PROC"
            posted = self.shim.agent.post_many(parts)  # storage parts move in parallel
            self.posted = posted
            self.t_posted = time.monotonic()
            if not posted:
                self._all_done(msg)
            else:
                for t in posted:
                    t.on_done(lambda t=t: self._part_done(t, msg))  # type: ignore[misc]
        except fabric.WeftError as exc:
            self.status = "ERR"
            self.error = exc
            raise _convert.nixl_error(exc) from exc
        return self.state()

    def _part_done(self, t: fabric.Transfer, msg: bytes) -> None:
        with self._lock:  # only this post's parts call here: a post in progress is never reposted
            if self.status != "PROC":
                return
            if t.error is not None:
                self.error = t.error
                self.status = "ERR"
                self.t_end = time.monotonic()
                return
            self._done_parts += 1
            last = self._done_parts == len(self.posted)
        if last:
            self._all_done(msg)

    def _all_done(self, msg: bytes) -> None:
        if msg:
            self.shim.notify_later(self, msg)
        else:
            self.t_end = time.monotonic()
            self.status = "DONE"

    def notified(self, exc: BaseException | None) -> None:
        """The notifier thread sent (or failed to send) the notification."""
        self.error = exc
        self.t_end = time.monotonic()
        self.status = "ERR" if exc is not None else "DONE"

    def state(self) -> str:
        """DONE, PROC or ERR. Never waits; a look at a transfer in progress may do one queued
        piece of its copy in this thread first (`Transfer.assist`), so a client that polls
        moves its own bytes instead of spinning beside the threads that do."""
        if len(self.parts) == 1 and self.posted:
            t = self.posted[0]
            t.assist()
            s = _STATE[t.state]
            if s == "ERR":
                self.error = t.error
            elif s == "DONE" and not self.t_end:
                self.t_end = t.t_done or time.monotonic()
            return s
        status = self.status
        if status == "PROC":
            for t in self.posted:
                if t.assist():
                    break
            for t in self.posted:  # a look past a deadline ends the part (weft's lazy deadline)
                t.done()
            status = self.status
        if status is None:
            raise nixlBind.nixlNotPostedError("the transfer was not posted")
        return status

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        for t in self.posted:
            t.release()
        for p in self.parts:
            p.release()
        for h in self.owned:
            h.release()


class _Shim:
    """What NIXL's pybind ``nixlAgent`` is to ``nixl_agent``: handles by number, a notifier."""

    def __init__(self) -> None:
        self.xfers: dict[int, _Xfer] = {}
        self.dlists: dict[int, _Prepped] = {}
        self._ids = itertools.count(0x1000)
        self._notes: queue.SimpleQueue[tuple[_Xfer, bytes] | None] | None = None
        self._lock = threading.Lock()
        self.send: Callable[[str, bytes], None] | None = None
        self.agent: Agent  # set by the nixl_agent that owns this shim

    def next_id(self) -> int:
        return next(self._ids)

    def releaseXferReq(self, handle: int) -> None:
        x = self.xfers.pop(handle, None)
        if x is not None:
            x.release()

    def releasedDlistH(self, handle: int) -> None:
        self.dlists.pop(handle, None)

    def notify_later(self, x: _Xfer, msg: bytes) -> None:
        with self._lock:
            if self._notes is None:
                self._notes = queue.SimpleQueue()
                threading.Thread(target=self._notifier, args=(self._notes,), daemon=True).start()
            self._notes.put((x, msg))

    def _notifier(self, notes: queue.SimpleQueue[tuple[_Xfer, bytes] | None]) -> None:
        while (item := notes.get()) is not None:
            x, msg = item
            try:
                assert self.send is not None
                self.send(x.peer, msg)
            except Exception as exc:  # the handle reads ERR; the thread lives on
                x.notified(exc)
            else:
                x.notified(None)

    def close(self) -> None:
        if self._notes is not None:
            self._notes.put(None)


def _indices(idx: Any, count: int, side: str) -> npt.NDArray[np.int64]:
    arr = np.asarray(idx if not isinstance(idx, range) else np.arange(idx.start, idx.stop, idx.step))
    arr = arr.astype(np.int64, copy=False).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= count):
        bad = int(arr[(arr < 0) | (arr >= count)][0])
        raise nixlBind.nixlInvalidParamError(f"{side} index {bad} out of range ({count} descriptors)")
    return arr


class nixl_agent(Memory, Metadata):
    """NIXL's agent over one weft `Agent`.

    Args:
        agent_name: the agent's name (weft's rules: letters, digits, ``._:-``).
        nixl_conf: a `nixl_agent_config`; default one otherwise.
        instantiate_all: create every plugin (UCX, POSIX, OBJ where available).
    Raises:
        nixlInvalidParamError: a bad name or weft setting.
    """

    def __init__(
        self, agent_name: str, nixl_conf: nixl_agent_config | None = None, instantiate_all: bool = False
    ) -> None:
        if nixl_conf and instantiate_all:
            instantiate_all = False
            logger.warning("Ignoring instantiate_all based on the provided config in agent creation.")
        if not nixl_conf:
            nixl_conf = nixl_agent_config()
        self.name = agent_name
        self._conf = nixl_conf
        self._leaked_xfer_handles: list[int] = []
        self.notifs: dict[str, list[bytes]] = {}
        self.backends: dict[str, nixl_backend_handle] = {}
        self.backend_mems: dict[str, list[str]] = {}
        self.backend_options: dict[str, dict[str, str]] = {}
        self.plugin_list = list(PLUGINS)
        self.plugin_b_options: dict[str, dict[str, str]] = {}
        self.plugin_mem_types: dict[str, list[str]] = {}
        self.nixl_mems = dict(_MEM)
        self.nixl_ops = {"WRITE": nixlBind.NIXL_WRITE, "READ": nixlBind.NIXL_READ}
        wanted = list(self.plugin_list if instantiate_all else nixl_conf.backends)
        weft_paths = [
            Backend(b.lower()) for b in wanted if b.lower() in {"local", "tcp", "ucx"} and b != "UCX"
        ]
        self.agent = self._new_agent(agent_name, tuple(weft_paths) or UCX_PATHS)
        self._shim = _Shim()
        self._shim.send = self._send_bytes
        self._shim.agent = self.agent
        self._local = _Table()
        self._regs: list[tuple[nixlBind.nixl_mem_t, int, int, int, Any]] = []
        self._remote: dict[str, tuple[int, _Table]] = {}
        self._loop_notifs: list[bytes] = []
        self._lock = threading.RLock()
        self._exchange = self._start_exchange(nixl_conf)
        self._etcd = self._start_central()
        for bknd in wanted:
            if bknd not in self.plugin_list and bknd.lower() not in {"local", "tcp", "ucx"}:
                logger.warning("Skipping backend registration %s due to the missing plugin.", bknd)
                continue
            try:
                self.create_backend(bknd, {})
            except nixlBind.nixlError as exc:
                logger.warning("Skipping backend %s: %s", bknd, exc)
        logger.info("Initialized NIXL agent (weft): %s", agent_name)

    @staticmethod
    def _new_agent(name: str, paths: tuple[Backend, ...]) -> Agent:
        try:
            return Agent(name, _weft_config(paths))
        except fabric.WeftError as exc:
            raise _convert.nixl_error(exc) from exc

    def _start_exchange(self, conf: nixl_agent_config) -> _exchange.Exchange:
        hooks = _exchange.Hooks(
            self.name, self.agent.metadata, self.agent.add_peer, self._forget, self.agent.config.secret
        )
        try:
            return _exchange.Exchange(hooks, conf.enable_listen, self.agent.config.listen_host, conf.port)
        except OSError as exc:
            self.agent.close()
            raise nixlBind.nixlBackendError(f"cannot listen on port {conf.port}: {exc}") from exc

    @property
    def listen_port(self) -> int:
        """The metadata listener's port (the one asked for, or the one given for port 0)."""
        return self._exchange.port

    def close(self) -> None:
        """Release every handle and close the weft agent (not in NIXL: its agent ends at GC)."""
        for x in list(self._shim.xfers.values()):
            x.release()
        self._shim.close()
        self._exchange.close()
        if self._etcd is not None:
            self._etcd.close()
        self.agent.close()

    # -- preparing --------------------------------------------------------------------------
    def prep_xfer_dlist(
        self,
        agent_name: str | bytes,
        xfer_list: Any,
        mem_type: str | None = None,
        backends: list[str] = [],  # noqa: B006
    ) -> nixl_prepped_dlist_handle:
        """Map descriptors to regions once: local ("" / "NIXL_INIT_AGENT"), loopback (this
        agent's name) or a remote agent (str, or the bytes ``add_remote_agent`` returned).

        Raises:
            nixlNotFoundError: an unknown agent, or a descriptor in no registered region.
            nixlInvalidParamError: unreadable descriptors.
        """
        name = self._peer_name(agent_name)
        descs = self.get_xfer_descs(xfer_list, mem_type)
        if descs is None:
            raise nixlBind.nixlInvalidParamError("prepXferDlist: cannot read the descriptor list")
        seg = descs.getType()
        local = name in ("", "NIXL_INIT_AGENT")
        loopback = name == self.name
        rows = descs.descs()
        regs: list[Any] = []
        slot: dict[int, int] = {}
        reg_idx = np.empty(len(rows), dtype=np.int64)
        offsets = np.empty(len(rows), dtype=np.uint64)
        if local or loopback:
            with self._lock:
                for i, (addr, size, dev) in enumerate(rows):
                    found = self._local.find(seg, dev, addr, size)
                    if found is None:
                        raise nixlBind.nixlNotFoundError(
                            f"prepXferDlist: descriptor {i} ({addr:#x}, {size}, {dev}) "
                            "is in no registered region"
                        )
                    reg, off = found
                    reg_idx[i] = slot.setdefault(id(reg), len(regs))
                    if reg_idx[i] == len(regs):
                        regs.append(reg)
                    offsets[i] = off
        else:
            table = self._remote_table(name)
            rids: list[int] = []
            for i, (addr, size, _dev) in enumerate(rows):
                found = table.find(seg, 0, addr, size)
                if found is None:  # registered after its metadata was sent: ask the peer once
                    table = self._remote_table(name, refresh=True)
                    found = table.find(seg, 0, addr, size)
                if found is None:
                    raise nixlBind.nixlNotFoundError(
                        f"prepXferDlist: descriptor {i} ({addr:#x}, {size}) is in no region of {name!r}"
                    )
                rid, off = found
                reg_idx[i] = slot.setdefault(rid, len(rids))
                if reg_idx[i] == len(rids):
                    rids.append(rid)
                offsets[i] = off
            try:
                regs = [self.agent.remote(name, rid) for rid in rids]
            except fabric.WeftError as exc:
                raise _convert.nixl_error(exc) from exc
        arr = descs.array()
        prepped = _Prepped(
            None if local else name, loopback, seg, regs, reg_idx, offsets, arr[:, 1].copy(), arr[:, 0].copy()
        )
        hid = self._shim.next_id()
        self._shim.dlists[hid] = prepped
        return nixl_prepped_dlist_handle(self._shim, hid, prepped)

    def make_prepped_xfer(
        self,
        operation: str,
        local_xfer_side: nixl_prepped_dlist_handle,
        local_indices: Any,
        remote_xfer_side: nixl_prepped_dlist_handle,
        remote_indices: Any,
        notif_msg: bytes | str = b"",
        backends: list[str] = [],  # noqa: B006
        skip_desc_merge: bool = False,
    ) -> nixl_xfer_handle:
        """A transfer from prepared lists by index (lists, numpy arrays, ranges), built once:
        the descriptors grouped by (local region, remote region), one weft prepared transfer
        per group.

        Raises:
            nixlInvalidParamError: bad operation, indices or lengths. nixlNotFoundError: a
            released list or a peer gone. nixlNotAllowedError: a read-only target.
        """
        op = self._op(operation)
        lh, rh = self._prepped(local_xfer_side), self._prepped(remote_xfer_side)
        if lh.peer is not None:
            raise nixlBind.nixlInvalidParamError("makeXferReq: the local side must be prepared with ''")
        if rh.peer is None:
            raise nixlBind.nixlInvalidParamError(
                "makeXferReq: the remote side needs a remote or loopback name"
            )
        li = _indices(local_indices, len(lh.reg_idx), "local")
        ri = _indices(remote_indices, len(rh.reg_idx), "remote")
        if len(li) != len(ri):
            raise nixlBind.nixlInvalidParamError(
                f"makeXferReq: different number of indices for local ({len(li)}), remote ({len(ri)})"
            )
        if len(li) == 0:
            raise nixlBind.nixlInvalidParamError("makeXferReq: no descriptors")
        lens = lh.lengths[li]
        if not np.array_equal(lens, rh.lengths[ri]):
            raise nixlBind.nixlInvalidParamError("makeXferReq: local and remote descriptor lengths differ")
        x = self._build(op, lh, li, rh, ri, _convert.text_bytes(notif_msg))
        return self._handle(x)

    def _op(self, operation: str) -> Op:
        if operation not in self.nixl_ops:
            raise nixlBind.nixlInvalidParamError(f"operation must be 'READ' or 'WRITE', not {operation!r}")
        return Op.WRITE if operation == "WRITE" else Op.READ

    def _prepped(self, h: nixl_prepped_dlist_handle) -> _Prepped:
        p = h._x if isinstance(h, nixl_prepped_dlist_handle) else None
        if p is None or h._released:
            raise nixlBind.nixlNotFoundError("the prepared descriptor list was released")
        return p  # type: ignore[no-any-return]

    def _backend_name(self, rh: _Prepped) -> str:
        if rh.seg is nixlBind.FILE_SEG:
            return "POSIX"
        if rh.seg is nixlBind.OBJ_SEG:
            return "OBJ"
        return next(iter(b for b in self.backends if b not in ("POSIX", "OBJ")), "UCX")

    def _build(
        self,
        op: Op,
        lh: _Prepped,
        li: npt.NDArray[np.int64],
        rh: _Prepped,
        ri: npt.NDArray[np.int64],
        notif: bytes,
    ) -> _Xfer:
        assert rh.peer is not None
        x = _Xfer(self._shim, rh.peer, notif, self._backend_name(rh))
        lens = lh.lengths[li]
        x.nbytes = int(lens.sum())
        x.ndescs = len(li)
        key = lh.reg_idx[li] * max(len(rh.regs), 1) + rh.reg_idx[ri]
        groups, first = np.unique(key, return_index=True)
        order = groups[np.argsort(first)]  # keep the caller's order of regions
        memcpy = rh.loopback and lh.seg is nixlBind.DRAM_SEG and rh.seg is nixlBind.DRAM_SEG
        try:
            if memcpy:  # same process, host memory: the bytes are copied at post
                src, dst = (lh.addrs[li], rh.addrs[ri]) if op is Op.WRITE else (rh.addrs[ri], lh.addrs[li])
                x.copies = list(zip(dst.tolist(), src.tolist(), lens.tolist(), strict=True))
            else:
                pairs = []
                for g in order:
                    sel = np.flatnonzero(key == g)
                    lreg = lh.regs[int(lh.reg_idx[li[sel[0]]])]
                    rreg = rh.regs[int(rh.reg_idx[ri[sel[0]]])]
                    lpairs = np.stack([lh.offsets[li[sel]], lens[sel]], axis=1)
                    rpairs = np.stack([rh.offsets[ri[sel]], lens[sel]], axis=1)
                    pairs.append((lreg.descs(lpairs), rreg.descs(rpairs)))
                if len(pairs) == 1:
                    x.parts.append(self.agent.prepare(op, pairs[0][0], rh.peer, pairs[0][1], notif or None))
                elif rh.loopback:  # own files or objects: one weft request over every region
                    x.parts.append(self.agent.prepare_batch(op, pairs, notif or None))
                else:  # one weft request per region pair; the notification follows them all
                    x.parts += [self.agent.prepare(op, lo, rh.peer, re, None) for lo, re in pairs]
        except fabric.WeftError as exc:
            x.release()
            raise _convert.nixl_error(exc) from exc
        return x

    def _handle(self, x: _Xfer) -> nixl_xfer_handle:
        hid = self._shim.next_id()
        self._shim.xfers[hid] = x
        return nixl_xfer_handle(self._shim, hid, x)

    def initialize_xfer(
        self,
        operation: str,
        local_descs: nixlBind.nixlXferDList,
        remote_descs: nixlBind.nixlXferDList,
        remote_agent: str | bytes,
        notif_msg: bytes | str = b"",
        backends: list[str] = [],  # noqa: B006
    ) -> nixl_xfer_handle:
        """Prepare both lists and the transfer in one call (NIXL's combined API)."""
        op = self._op(operation)
        lh = self.prep_xfer_dlist("", local_descs)
        rh = self.prep_xfer_dlist(remote_agent, remote_descs)
        n_local, n_remote = local_descs.descCount(), remote_descs.descCount()
        if n_local != n_remote:
            lh.release()
            rh.release()
            raise nixlBind.nixlInvalidParamError(
                f"createXferReq: different number of descriptors for local ({n_local}), remote ({n_remote})"
            )
        idx = np.arange(n_local)
        try:
            lp, rp = self._prepped(lh), self._prepped(rh)
            if not np.array_equal(lp.lengths, rp.lengths):
                raise nixlBind.nixlInvalidParamError("createXferReq: descriptor lengths differ")
            x = self._build(op, lp, idx, rp, idx, _convert.text_bytes(notif_msg))
        except Exception:
            lh.release()
            rh.release()
            raise
        x.owned = [lh, rh]
        return self._handle(x)

    # -- transfers --------------------------------------------------------------------------
    def _xfer(self, handle: nixl_xfer_handle) -> _Xfer:
        x = handle._x
        if x is None or handle._released:
            raise nixlBind.nixlNotFoundError("the transfer handle was released")
        return x  # type: ignore[no-any-return]

    def transfer(self, handle: nixl_xfer_handle, notif_msg: bytes | str = b"") -> str:
        """Post the transfer; "DONE", "PROC" or "ERR".

        Raises:
            nixlRepostActiveError: still in progress. nixlBackendError and the others: weft
            refused to start it (peer lost, agent closed ...).
        """
        x = self._xfer(handle)
        return x.post(notif_msg if notif_msg.__class__ is bytes else _convert.text_bytes(notif_msg))

    def check_xfer_state(self, handle: nixl_xfer_handle) -> str:
        """ "DONE", "PROC" or "ERR"; reads state only, never blocks. A failed transfer reads
        "ERR" (its weft error is kept for ``get_xfer_telemetry``'s caller in logs)."""
        x = handle._x
        if x is None or handle._released:
            raise nixlBind.nixlNotFoundError("the transfer handle was released")
        return x.state()  # type: ignore[no-any-return]

    def get_xfer_telemetry(self, handle: nixl_xfer_handle) -> nixlBind.nixlXferTelemetry:
        """Times (µs), bytes and descriptors of the last post.

        Raises:
            nixlNoTelemetryError: capture_telemetry was not set (as NIXL).
        """
        if not self._conf.capture_telemetry:
            raise nixlBind.nixlNoTelemetryError("telemetry is not enabled (capture_telemetry=False)")
        x = self._xfer(handle)
        if x.status is None:
            raise nixlBind.nixlNotPostedError("the transfer was not posted")
        x.state()
        t = nixlBind.nixlXferTelemetry()
        t.startTime = int(x.t_start * 1e6)
        t.postDuration = int((x.t_posted - x.t_post) * 1e6)
        t.xferDuration = int(((x.t_end or time.monotonic()) - x.t_post) * 1e6)
        t.totalBytes = x.nbytes
        t.descCount = x.ndescs
        return t

    def query_xfer_backend(self, handle: nixl_xfer_handle) -> str:
        """The NIXL backend name of the transfer ("UCX" for weft's DRAM paths)."""
        return self._xfer(handle).backend

    def estimate_xfer_cost(self, req_handle: nixl_xfer_handle) -> tuple[int, int, str]:
        """Not offered by weft's backends (NIXL's UCX estimates analytically)."""
        raise nixlBind.nixlNotSupportedError("estimateXferCost: weft's backends give no estimate")

    def release_xfer_handle(self, handle: nixl_xfer_handle) -> None:
        """Release; a transfer still in flight is cancelled first."""
        handle.release()

    def release_dlist_handle(self, handle: nixl_prepped_dlist_handle) -> None:
        handle.release()

    def make_connection(self, remote_agent: str | bytes, backends: list[str] = []) -> None:  # noqa: B006
        """Connect and authenticate now rather than at the first transfer."""
        try:
            self.agent.connect(self._peer_name(remote_agent))
        except fabric.WeftError as exc:
            raise _convert.nixl_error(exc) from exc
