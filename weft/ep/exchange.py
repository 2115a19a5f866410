"""Token dispatch and combine for wide expert parallelism.

Every rank of a group binds one `Exchange` to its fabric `Agent` and the group's plan
(`EpPlan`: epoch, ranks, expert -> hosting ranks). A step is
``combine(dispatch(x, expert_ids))``: `dispatch` sends each token's row to a live rank hosting
its expert, one WRITE (with a notification) per peer, choosing among replicas to balance
load; every rank serves the experts it hosts with its `expert_fn` as batches arrive, and
WRITEs the results back; `combine` gathers them in the original token order.

Why a serving thread and not a collective: a collective step waits for every rank, so one
dead rank stalls all of them (NIXL's EP example masks ranks after 30 s). Here a rank that
has not answered within `deadline` (default 0.5 s), or whose transfer failed, is masked for
the rest of the epoch, and its tokens are dispatched again to surviving replicas within the
same step; tokens whose expert has no live replica come back flagged in `Combined.missing`.

Epochs: every message carries the sender's plan epoch. A rank that receives a message for
another epoch rejects it (a typed rejection the sender raises as `EpochMismatchError`), so a
step never mixes plans: it completes on the epoch it started with, or fails typed.

Memory: four regions registered once, each with one slot per rank: ``ep-inbox`` (batches
peers send here), ``ep-results`` (results peers send back), and two local staging areas
the WRITEs read from. WRITEs are prepared once per (peer, slot, size) and re-posted with each
step's notification (prepare once, post many). A slot holds a header, the expert ids and
`max_tokens` rows. Slots are reused only after the peer answered, so a slot is never
overwritten while in use.

Wire (notifications, little-endian): ``WEPD`` dispatch and ``WEPR`` results carry
(epoch, step, rank, tokens, round); ``WEPX`` rejects (epoch, step, rank, round, code) plus
a reason. The slot's own header repeats (epoch, step, rank, tokens) and is checked against
the notification, so a stale or torn slot is refused, never used. Malformed messages are
counted and rejected; they never raise in the serving thread.
"""

from __future__ import annotations

import collections
import enum
import logging
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from weft.fabric import errors, gpu
from weft.fabric.agent import Agent
from weft.fabric.memory import Registration, RemoteRegion
from weft.fabric.transfer import PreparedTransfer, Transfer
from weft.fabric.types import Op, TransferState

log = logging.getLogger(__name__)

ExpertFn = Callable[[int, np.ndarray], np.ndarray]
"""(expert id, rows [n, hidden]) -> rows [n, hidden] of the same dtype: the expert's FFN."""

INBOX, RESULTS = "ep-inbox", "ep-results"
DEADLINE = 0.5
_NOTE = struct.Struct("<4sQQIIB")  # magic, epoch, step, rank, tokens, round
_REJECT = struct.Struct("<4sQQIBB")  # magic, epoch, step, rank, round, code
_SLOT = struct.Struct("<4sQQII")  # magic, epoch, step, rank, tokens (the slot's own header)
_HEADER_BYTES = 64
DISPATCH, RESULT, REJECT = b"WEPD", b"WEPR", b"WEPX"


class EpError(errors.WeftError):
    """An expert-parallel step failed."""


class EpochMismatchError(EpError):
    """A peer is on another plan epoch: the step started on `epoch` cannot finish on it."""


class Reject(enum.IntEnum):
    STALE = 1  # the message's epoch is older than the receiver's
    AHEAD = 2  # newer than the receiver's (it has not seen that plan yet)
    MALFORMED = 3
    NOT_HOSTED = 4  # a token for an expert this rank does not host in that epoch


@dataclass(frozen=True)
class EpPlan:
    """What an exchange needs of the group's plan."""

    epoch: int
    ranks: tuple[str, ...]  # member names; a rank's index is its position
    experts: Mapping[int, tuple[str, ...]]  # expert -> ranks hosting it

    @classmethod
    def from_placement(
        cls, epoch: int, experts: Mapping[Any, Sequence[str]], ranks: Sequence[str] = ()
    ) -> EpPlan:
        """From a plan's expert placement (``PlanRecord.experts``: id as str -> members)."""
        placed = {int(e): tuple(hosts) for e, hosts in experts.items()}
        names = sorted(set(ranks) | {h for hosts in placed.values() for h in hosts})
        return cls(epoch, tuple(names), placed)

    def hosted_by(self, rank: str) -> set[int]:
        return {e for e, hosts in self.experts.items() if rank in hosts}


@dataclass
class Dispatched:
    """A step in flight: what went where (`combine` needs it)."""

    plan: EpPlan  # the plan the step started on (it finishes on it, or fails typed)
    step: int
    x: np.ndarray
    expert_ids: np.ndarray
    out: np.ndarray
    missing: np.ndarray  # bool per token: no live replica of its expert
    pending: dict[str, np.ndarray]  # peer -> token indices awaiting its results
    rounds: dict[str, int]  # peer -> round of the batch it holds
    posted: dict[str, float]  # peer -> when its batch was sent
    transfers: dict[str, Transfer] = field(default_factory=dict)
    masked: list[str] = field(default_factory=list)  # peers masked during this step
    redo: list[np.ndarray] = field(default_factory=list)  # tokens of masked peers, to send again
    redispatched: int = 0
    on_device: bool = False  # x came as a CUDA array: `combine` returns one too

    @property
    def epoch(self) -> int:
        return self.plan.epoch


@dataclass(frozen=True)
class Combined:
    out: Any  # [n, hidden] in the original token order: numpy, or CuPy when x was on a GPU
    missing: np.ndarray  # bool [n]: tokens whose expert had no live replica (rows are zero)
    masked: tuple[str, ...]  # ranks masked during the step
    redispatched: int  # tokens sent again after a rank was masked


class Exchange:
    """One rank's side of the token exchange.

    Args:
        agent: this rank's fabric agent, named as in the plan; the exchange takes over its
            notifications (use an agent per exchange).
        plan: the current plan; `update_plan` moves to a newer one.
        expert_fn: computes an expert on rows this rank receives.
        hidden: activation width; dtype: activation dtype (numpy arrays; rows are bytes on the wire).
        max_tokens: most tokens one step sends to one peer (sizes the slots).
        deadline: seconds a peer has to answer before it is masked for the epoch.
    """

    def __init__(
        self,
        agent: Agent,
        plan: EpPlan,
        expert_fn: ExpertFn,
        *,
        hidden: int,
        dtype: npt.DTypeLike = np.float16,
        max_tokens: int = 4096,
        deadline: float = DEADLINE,
    ) -> None:
        if hidden <= 0 or max_tokens <= 0 or deadline <= 0:
            raise errors.ConfigError("hidden, max_tokens and deadline must be > 0")
        self.agent, self.expert_fn = agent, expert_fn
        self.hidden, self.dtype, self.max_tokens, self.deadline = (
            hidden,
            np.dtype(dtype),
            max_tokens,
            deadline,
        )
        self.row_bytes = hidden * self.dtype.itemsize
        self.slot_bytes = _HEADER_BYTES + 4 * max_tokens + max_tokens * self.row_bytes
        self._lock = threading.Condition()
        self._plan = plan
        self._check_plan(plan)
        world = len(plan.ranks)
        self._slots = world
        self.inbox = agent.alloc(self.slot_bytes * world, INBOX)
        self.results = agent.alloc(self.slot_bytes * world, RESULTS)
        self.staging = agent.alloc(self.slot_bytes * world)  # what our WRITEs read from
        self.replies = agent.alloc(self.slot_bytes * world)  # what our result WRITEs read from
        self._remote: dict[tuple[str, str], RemoteRegion] = {}
        # prepared WRITEs by (peer, region, local slot, remote slot, bytes), re-posted with
        # each step's notification: steady batch shapes are laid out once (prepare once,
        # post many); least recently used go first
        self._prepared: collections.OrderedDict[tuple[str, str, int, int, int], PreparedTransfer] = (
            collections.OrderedDict()
        )
        self._prepared_lock = threading.Lock()
        self.prepared_limit = 4 * world
        self.prepares = 0  # transfers laid out (a steady workload stops adding to it)
        self._masked: set[str] = set()  # masked for the current epoch
        self._step = 0
        self._arrived: dict[tuple[int, int, str, int], int] = {}  # (epoch, step, peer, round) -> tokens
        self._rejected: dict[tuple[int, int, str], tuple[Reject, str]] = {}
        self.served = 0
        self.refused = 0
        self._closed = threading.Event()
        self._pump = threading.Thread(target=self._pump_loop, name=f"weft-ep {agent.name}", daemon=True)
        self._pump.start()

    # -- plan ------------------------------------------------------------------------------
    @property
    def plan(self) -> EpPlan:
        return self._plan

    @property
    def rank(self) -> int:
        return self._plan.ranks.index(self.agent.name)

    @property
    def epoch(self) -> int:
        return self._plan.epoch

    def _check_plan(self, plan: EpPlan) -> None:
        if self.agent.name not in plan.ranks:
            raise errors.ConfigError(f"{self.agent.name!r} is not a rank of the plan of epoch {plan.epoch}")

    def update_plan(self, plan: EpPlan) -> None:
        """Move to a newer plan: masks are forgotten; messages of the old epoch are refused."""
        with self._lock:
            if plan.epoch <= self._plan.epoch:
                raise EpochMismatchError(f"plan epoch {plan.epoch} is not newer than {self._plan.epoch}")
            self._check_plan(plan)
            if len(plan.ranks) > self._slots:
                raise errors.ConfigError(
                    f"{len(plan.ranks)} ranks, but slots for {self._slots} (make a new Exchange)"
                )
            self._plan, self._masked = plan, set()
            self._remote.clear()  # peers may have restarted: their regions are asked again
            with self._prepared_lock:
                while self._prepared:
                    self._prepared.popitem()[1].release()
            self._lock.notify_all()

    @property
    def masked(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._masked)

    # -- the caller's side -----------------------------------------------------------------
    def dispatch(self, x: Any, expert_ids: npt.ArrayLike) -> Dispatched:
        """Send each row of `x` ([n, hidden], numpy or a C-contiguous CUDA array such as
        CuPy's) to a live rank hosting ``expert_ids[i]``. CUDA activations go through host
        memory (one copy each way); `combine` then returns a CUDA array."""
        on_device = hasattr(x, "__cuda_array_interface__")
        if on_device:
            x = _to_host(x)
        ids = np.asarray(expert_ids, dtype=np.int64).reshape(-1)
        if x.ndim != 2 or x.shape[1] != self.hidden or x.dtype != self.dtype:
            raise errors.InvalidBufferError(
                f"x must be [n, {self.hidden}] {self.dtype}, not {x.shape} {x.dtype}"
            )
        if len(ids) != x.shape[0]:
            raise errors.InvalidBufferError(f"{len(ids)} expert ids for {x.shape[0]} tokens")
        x = np.ascontiguousarray(x)
        with self._lock:
            self._step += 1
            plan, step, masked = self._plan, self._step, set(self._masked)
        d = Dispatched(
            plan=plan, step=step, x=x, expert_ids=ids,
            out=np.zeros_like(x), missing=np.zeros(len(ids), dtype=bool),
            pending={}, rounds={}, posted={}, on_device=on_device,
        )  # fmt: skip
        self._send(d, plan, np.arange(len(ids)), masked, round_=0)
        return d

    def _send(self, d: Dispatched, plan: EpPlan, tokens: np.ndarray, masked: set[str], round_: int) -> None:
        routes = route(plan, d.expert_ids, tokens, masked)
        lost = routes.pop("", [])
        if lost:
            d.missing[lost] = True
        me = self.agent.name
        for peer, toks in routes.items():
            idx = np.asarray(toks, dtype=np.int64)
            if len(idx) > self.max_tokens:
                raise errors.InvalidBufferError(
                    f"{len(idx)} tokens for {peer}: more than max_tokens {self.max_tokens}"
                )
            if peer == me:  # our own experts: no wire
                d.out[idx] = self._compute(d.expert_ids[idx], d.x[idx])
                continue
            slot, me_rank = plan.ranks.index(peer), plan.ranks.index(me)
            nbytes = self._pack(self.staging, slot, d.epoch, d.step, me_rank, d.expert_ids[idx], d.x[idx])
            d.pending[peer], d.rounds[peer], d.posted[peer] = idx, round_, time.monotonic()
            note = _NOTE.pack(DISPATCH, d.epoch, d.step, me_rank, len(idx), round_)
            try:
                d.transfers[peer] = self._post(self.staging, INBOX, peer, slot, me_rank, nbytes, note)
            except errors.WeftError as exc:
                log.info("%s: dispatch to %s failed: %s", me, peer, exc)
                d.posted[peer] = float("-inf")  # masked at the next look

    def combine(self, d: Dispatched, timeout: float | None = None) -> Combined:
        """Gather the results of `d` in token order; re-dispatch what masked ranks held.

        Raises:
            EpochMismatchError: a peer is on another epoch (the step does not mix plans).
            TimeoutError: `timeout` (default: no bound but the deadlines) ran out.
        """
        give_up = None if timeout is None else time.monotonic() + timeout
        while d.pending or d.redo:
            with self._lock:
                now = time.monotonic()
                for peer in list(d.pending):
                    rejected = self._rejected.pop((d.epoch, d.step, peer), None)
                    if rejected is not None:
                        code, reason = rejected
                        self._forget(d)
                        raise EpochMismatchError(
                            f"{peer} refused step {d.step} of epoch {d.epoch}: {code.name} {reason}"
                        )
                    got = self._arrived.pop((d.epoch, d.step, peer, d.rounds[peer]), None)
                    if got is not None:
                        self._take(d, peer, got)
                for p in [
                    p for p in d.pending if now - d.posted[p] > self.deadline or _failed(d.transfers.get(p))
                ]:
                    if p not in self._masked:
                        log.warning("%s: masking %s for epoch %d (no answer in %.2f s)", self.agent.name,
                                    p, d.epoch, self.deadline)  # fmt: skip
                    self._masked.add(p)
                    d.masked.append(p)
                    d.redo.append(d.pending.pop(p))
                masked, plan = set(self._masked), self._plan
                if d.pending:
                    wait = min(d.posted[p] for p in d.pending) + self.deadline - now
                    if give_up is not None:
                        wait = min(wait, give_up - now)
                    self._lock.wait(max(0.0, min(wait, 0.05)))
            if d.redo and not d.pending:
                # every live peer has answered, so its slots are free: send the masked peers'
                # tokens to the surviving replicas, as one more round
                if plan.epoch != d.epoch:
                    self._forget(d)
                    raise EpochMismatchError(
                        f"the plan moved to epoch {plan.epoch} during step {d.step} of {d.epoch}"
                    )
                again = np.concatenate(d.redo)
                d.redo.clear()
                d.redispatched += len(again)
                self._send(d, plan, again, masked, round_=max(d.rounds.values(), default=0) + 1)
            if give_up is not None and time.monotonic() > give_up and (d.pending or d.redo):
                self._forget(d)
                raise TimeoutError(f"step {d.step}: no answer from {sorted(d.pending)}")
        out = _to_device(d.out) if d.on_device else d.out
        return Combined(out, d.missing, tuple(d.masked), d.redispatched)

    def step(self, x: Any, expert_ids: npt.ArrayLike) -> Combined:
        return self.combine(self.dispatch(x, expert_ids))

    def _take(self, d: Dispatched, peer: str, tokens: int) -> None:
        idx = d.pending.pop(peer)
        slot = d.plan.ranks.index(peer)
        header = _read_header(self.results, slot, self.slot_bytes)
        if tokens != len(idx) or header != (d.epoch, d.step, slot, len(idx)):
            log.warning("%s: a bad result slot from %s: %s", self.agent.name, peer, header)
            d.pending[peer] = idx  # left for the deadline: masked and sent elsewhere
            d.posted[peer] = float("-inf")
            return
        start = slot * self.slot_bytes + _HEADER_BYTES + 4 * self.max_tokens
        rows = self.results.buffer[start : start + len(idx) * self.row_bytes]
        d.out[idx] = rows.view(self.dtype).reshape(len(idx), self.hidden)

    def _forget(self, d: Dispatched) -> None:
        for key in [k for k in self._arrived if k[0] == d.epoch and k[1] == d.step]:
            del self._arrived[key]
        d.pending.clear()
        d.redo.clear()

    # -- the serving side ------------------------------------------------------------------
    def _pump_loop(self) -> None:
        while not self._closed.is_set():
            try:
                n = self.agent.take_notification(0.1)
            except errors.NotificationTimeoutError:
                continue
            except errors.AgentClosedError:
                return
            try:
                self._on_message(n.peer, n.message)
            except Exception:  # a malformed message must not end the serving thread
                log.exception("%s: message from %s", self.agent.name, n.peer)
                self.refused += 1

    def _on_message(self, peer: str, msg: bytes) -> None:
        kind = msg[:4]
        if kind == RESULT and len(msg) == _NOTE.size:
            _, epoch, step, _rank, tokens, round_ = _NOTE.unpack(msg)
            with self._lock:
                self._arrived[(epoch, step, peer, round_)] = tokens
                self._lock.notify_all()
        elif kind == REJECT and len(msg) >= _REJECT.size:
            _, epoch, step, _rank, _round, code = _REJECT.unpack(msg[: _REJECT.size])
            with self._lock:
                self._rejected[(epoch, step, peer)] = (
                    Reject(code),
                    msg[_REJECT.size :].decode(errors="replace"),
                )
                self._lock.notify_all()
        elif kind == DISPATCH and len(msg) == _NOTE.size:
            self._serve(peer, *_NOTE.unpack(msg)[1:])
        else:
            self.refused += 1
            log.warning("%s: a malformed message from %s (%d bytes)", self.agent.name, peer, len(msg))

    def _serve(self, peer: str, epoch: int, step: int, rank: int, tokens: int, round_: int) -> None:
        plan = self._plan
        problem: tuple[Reject, str] | None = None
        if epoch < plan.epoch:
            problem = (Reject.STALE, f"epoch {epoch} is older than {plan.epoch}")
        elif epoch > plan.epoch:
            problem = (Reject.AHEAD, f"epoch {epoch} is newer than {plan.epoch}")
        elif (
            not (0 <= rank < len(plan.ranks)) or plan.ranks[rank] != peer or not 0 < tokens <= self.max_tokens
        ):
            problem = (Reject.MALFORMED, f"rank {rank} / {tokens} tokens from {peer}")
        elif _read_header(self.inbox, rank, self.slot_bytes) != (epoch, step, rank, tokens):
            problem = (Reject.MALFORMED, "the slot does not match the notification")
        if problem is None:
            base = rank * self.slot_bytes + _HEADER_BYTES
            ids = self.inbox.buffer[base : base + 4 * tokens].view(np.int32).astype(np.int64)
            hosted = plan.hosted_by(self.agent.name)
            if not set(np.unique(ids).tolist()) <= hosted:
                problem = (
                    Reject.NOT_HOSTED,
                    f"experts {sorted(set(ids.tolist()) - hosted)[:8]} are not here",
                )
        if problem is not None:
            self.refused += 1
            log.info("%s: refusing step %d from %s: %s", self.agent.name, step, peer, problem[1])
            reject = _REJECT.pack(REJECT, epoch, step, self.rank, round_, problem[0])
            with _quiet():
                self.agent.send_notification(peer, reject + problem[1].encode()[:512])
            return
        start = rank * self.slot_bytes + _HEADER_BYTES + 4 * self.max_tokens
        rows = (
            self.inbox.buffer[start : start + tokens * self.row_bytes]
            .view(self.dtype)
            .reshape(tokens, self.hidden)
        )
        result = self._compute(ids, rows)
        me = self.rank
        nbytes = self._pack(self.replies, rank, epoch, step, me, ids, result)
        with _quiet():  # the caller may be gone: its step is its own business
            self._post(
                self.replies,
                RESULTS,
                peer,
                rank,
                me,
                nbytes,
                _NOTE.pack(RESULT, epoch, step, me, tokens, round_),
            )
            self.served += tokens

    def _compute(self, ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
        out = np.empty_like(rows)
        for e in np.unique(ids).tolist():
            sel = ids == e
            out[sel] = self.expert_fn(int(e), rows[sel])
        return out

    # -- slots -----------------------------------------------------------------------------
    def _pack(
        self,
        reg: Registration,
        slot: int,
        epoch: int,
        step: int,
        rank: int,
        ids: np.ndarray,
        rows: np.ndarray,
    ) -> int:
        """Header, expert ids and rows into `slot` of `reg`; returns the bytes to send (the
        rows sit after room for `max_tokens` ids, so one contiguous range covers it all)."""
        buf, base, n = reg.buffer, slot * self.slot_bytes, len(ids)
        buf[base : base + _SLOT.size] = np.frombuffer(
            _SLOT.pack(b"WEPS", epoch, step, rank, n), dtype=np.uint8
        )
        buf[base + _HEADER_BYTES : base + _HEADER_BYTES + 4 * n] = ids.astype(np.int32).view(np.uint8)
        start = base + _HEADER_BYTES + 4 * self.max_tokens
        buf[start : start + n * self.row_bytes] = np.ascontiguousarray(rows).reshape(-1).view(np.uint8)
        return _HEADER_BYTES + 4 * self.max_tokens + n * self.row_bytes

    def _post(
        self,
        local: Registration,
        region: str,
        peer: str,
        local_slot: int,
        remote_slot: int,
        nbytes: int,
        note: bytes,
    ) -> Transfer:
        """WRITE `nbytes` from `local_slot` of `local` to `remote_slot` of the peer's `region`,
        through a prepared transfer kept for that shape."""
        key = (peer, region, local_slot, remote_slot, nbytes)
        with self._prepared_lock:
            prepared = self._prepared.pop(key, None)
        try:
            if prepared is None:
                self.prepares += 1
                remote = self._region(peer, region)
                prepared = self.agent.prepare(
                    Op.WRITE, local.descs([(local_slot * self.slot_bytes, nbytes)]), peer,
                    remote.descs([(remote_slot * self.slot_bytes, nbytes)]),
                )  # fmt: skip
            transfer = prepared.post(note, timeout=self.deadline * 4)
        except errors.WeftError:
            self._forget_peer(peer)  # a peer that failed (or restarted) is laid out again
            raise
        with self._prepared_lock:
            self._prepared[key] = prepared
            while len(self._prepared) > self.prepared_limit:
                self._prepared.popitem(last=False)[1].release()
        return transfer

    def _forget_peer(self, peer: str) -> None:
        with self._prepared_lock:
            for key in [k for k in self._prepared if k[0] == peer]:
                self._prepared.pop(key).release()
        self._remote = {k: v for k, v in self._remote.items() if k[0] != peer}

    def _region(self, peer: str, name: str) -> RemoteRegion:
        key = (peer, name)
        found = self._remote.get(key)
        if found is None:  # a peer that is gone fails the transfer itself (and is masked)
            found = self._remote[key] = self.agent.remote(peer, name, timeout=self.deadline * 4)
        return found

    def close(self) -> None:
        self._closed.set()
        self._pump.join(5)
        for reg in (self.inbox, self.results, self.staging, self.replies):
            reg.release()


def route(
    plan: EpPlan, ids: np.ndarray, tokens: np.ndarray, masked: Set[str] = frozenset()
) -> dict[str, list[int]]:
    """Tokens (indices into `ids`) per live rank: each expert's tokens split evenly over its
    replicas that are not `masked`, the least loaded first; tokens with no live replica go
    under ''."""
    load: dict[str, int] = {}
    out: dict[str, list[int]] = {}
    by_expert: dict[int, list[int]] = {}
    for t in tokens.tolist():
        by_expert.setdefault(int(ids[t]), []).append(t)
    for e, toks in by_expert.items():
        live = [r for r in plan.experts.get(e, ()) if r not in masked]
        if not live:
            out.setdefault("", []).extend(toks)
            continue
        share, extra = divmod(len(toks), len(live))
        live.sort(key=lambda r: load.get(r, 0))
        start = 0
        for i, r in enumerate(live):
            k = share + (1 if i < extra else 0)
            if k:
                out.setdefault(r, []).extend(toks[start : start + k])
                load[r] = load.get(r, 0) + k
                start += k
    return out


def _to_host(x: Any) -> np.ndarray:
    """A C-contiguous CUDA array, copied into a numpy array of the same shape and dtype."""
    iface = x.__cuda_array_interface__
    if iface.get("strides") is not None:
        raise errors.InvalidBufferError("CUDA activations must be C-contiguous")
    host = np.empty(tuple(iface["shape"]), dtype=np.dtype(iface["typestr"]))
    gpu.device_to_host(gpu.cuda_pointer(x), host.reshape(-1).view(np.uint8).data)
    return host


def _to_device(host: np.ndarray) -> Any:
    """`host` copied to a new device array (CuPy) of the same shape and dtype."""
    dev = gpu.alloc(host.nbytes)
    gpu.host_to_device(np.ascontiguousarray(host).reshape(-1).view(np.uint8).data, gpu.cuda_pointer(dev))
    return dev.view(host.dtype).reshape(host.shape)


def _read_header(reg: Registration, slot: int, slot_bytes: int) -> tuple[int, int, int, int] | None:
    if slot < 0:
        return None
    raw = bytes(reg.buffer[slot * slot_bytes : slot * slot_bytes + _SLOT.size])
    magic, epoch, step, rank, tokens = _SLOT.unpack(raw)
    return (epoch, step, rank, tokens) if magic == b"WEPS" else None


def _failed(t: Transfer | None) -> bool:
    return t is not None and t.done() and t.state is TransferState.ERROR


class _quiet:
    """Errors of the fabric, logged and dropped (the serving thread goes on)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if exc is not None and isinstance(exc, errors.WeftError):
            log.info("ep: %s", exc)
            return True
        return False
