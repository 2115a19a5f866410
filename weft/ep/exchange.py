"""Token dispatch and combine for wide expert parallelism.

Every rank of a group binds one `Exchange` to its fabric `Agent` and the group's plan
(`EpPlan`: epoch, ranks, expert -> hosting ranks). A step is
``combine(dispatch(x, expert_ids))``: `dispatch` sends each token's row to a live rank hosting
its expert, one WRITE (with a notification) per peer, choosing among replicas to balance
load; every rank acknowledges each batch as it arrives, serves the experts it hosts with its
`expert_fn`, and WRITEs the results back; `combine` gathers them in the original token order.

Why a serving thread and not a collective: a collective step waits for every rank, so one
dead rank stalls all of them (NIXL's EP example masks ranks after 30 s). Here masking follows
liveness (see `weft.ep.step`): a rank the group sees dead is masked at once (the agent's
peer-lost hook, a transfer that failed with the peer gone, the agent no longer knowing the
peer once membership removed it, or `Exchange.mask` from the caller); a rank that has not
answered within `deadline` (the straggler deadline) but whose connection is alive is a
straggler: its tokens go to another live replica within the same step, and it is not
masked; until it is heard from again, later steps use it last (only for tokens with no other
live replica), so a frozen rank costs one deadline, not one per step. A batch that fails
while its rank stays alive is sent again. Tokens whose expert
has no live replica come back flagged in `Combined.missing`; no other token ever does.

Epochs: every message carries the sender's plan epoch. A rank that receives a message for
another epoch rejects it (a typed rejection the sender raises as `EpochMismatchError`), so a
step never mixes plans: it completes on the epoch it started with, or fails typed.

Memory and wire: `weft.ep.slots` and `weft.ep.wire`. A slot is reused only after the peer
answered the batch in it within the step; the slot's header is checked against the
notification (round included), before and after its rows are read, so a stale or torn slot
is refused, never used: its batch is sent again. Malformed messages are counted and
rejected (`weft.ep.mailbox`); they never raise in the serving threads.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from weft.ep import mailbox, serve, slots, wire
from weft.ep import plan as plan_mod
from weft.ep import step as step_mod
from weft.fabric import errors, gpu
from weft.fabric.agent import Agent
from weft.fabric.transfer import Transfer
from weft.fabric.types import TransferState

log = logging.getLogger(__name__)

DEADLINE = 0.5
"""Default straggler deadline, seconds: a live rank that has not answered by then has its
tokens sent to a replica too (for that step; it is not masked)."""


class Exchange:
    """One rank's side of the token exchange.

    Args:
        agent: this rank's fabric agent, named as in the plan; the exchange takes over its
            notifications (use an agent per exchange) and hooks its peer-lost events.
        plan: the current plan; `update_plan` moves to a newer one.
        expert_fn: computes an expert on rows this rank receives.
        hidden: activation width; dtype: activation dtype (numpy arrays; rows are bytes on the wire).
        max_tokens: most tokens one step sends to one peer (sizes the slots).
        deadline: the straggler deadline: seconds a live peer has to answer a batch before its
            tokens go to a replica too, for that step (it is not masked; only a peer the group
            sees dead is). Transfers and region look-ups time out after four times it.
    """

    def __init__(
        self,
        agent: Agent,
        plan: plan_mod.EpPlan,
        expert_fn: plan_mod.ExpertFn,
        *,
        hidden: int,
        dtype: npt.DTypeLike = np.float16,
        max_tokens: int = 4096,
        deadline: float = DEADLINE,
    ) -> None:
        if hidden <= 0 or max_tokens <= 0 or deadline <= 0:
            raise errors.ConfigError("hidden, max_tokens and deadline must be > 0")
        if agent.name not in plan.ranks:
            raise errors.ConfigError(f"{agent.name!r} is not a rank of the plan of epoch {plan.epoch}")
        self.agent, self.expert_fn, self.deadline = agent, expert_fn, deadline
        self.hidden, self.dtype, self.max_tokens = hidden, np.dtype(dtype), max_tokens
        self._lock = threading.Condition()
        self._plan = plan
        self._slots = slots.Slots(
            agent,
            len(plan.ranks),
            hidden=hidden,
            dtype=self.dtype,
            max_tokens=max_tokens,
            timeout=deadline * 4,
        )
        self.row_bytes, self.slot_bytes = self._slots.row_bytes, self._slots.slot_bytes
        self._dead: set[str] = set()  # seen dead (fabric, membership, caller), this epoch
        self._reported: frozenset[str] = frozenset()  # masks as of the last step's result
        self._late: set[str] = set()  # stragglers not heard from since: used last, not masked
        self._step = 0
        self._box = mailbox.Mailbox(self._lock, self._serve, agent.name)
        self._closed = threading.Event()
        self._server = serve.Server(agent, self._slots, lambda: self._plan, expert_fn)
        agent.on_peer_lost(self._peer_lost)
        self._pump = threading.Thread(target=self._pump_loop, name=f"weft-ep {agent.name}", daemon=True)
        self._pump.start()

    # -- plan and liveness ------------------------------------------------------------------
    @property
    def plan(self) -> plan_mod.EpPlan:
        return self._plan

    @property
    def rank(self) -> int:
        return self._plan.ranks.index(self.agent.name)

    @property
    def epoch(self) -> int:
        return self._plan.epoch

    @property
    def served(self) -> int:
        """Tokens this rank computed for peers."""
        return self._server.served

    @property
    def refused(self) -> int:
        """Batches refused and messages that were malformed."""
        return self._server.refused + self._box.malformed

    @property
    def prepares(self) -> int:
        """Transfers laid out (a steady workload stops adding to it)."""
        return self._slots.prepares

    def update_plan(self, plan: plan_mod.EpPlan) -> None:
        """Move to a newer plan: masks are forgotten; messages of the old epoch are refused.

        Raises:
            EpochMismatchError: `plan` is not newer. ConfigError: this rank is not in it, or
                it has more ranks than the slots made at the start.
        """
        with self._lock:
            if plan.epoch <= self._plan.epoch:
                raise wire.EpochMismatchError(f"plan epoch {plan.epoch} is not newer than {self._plan.epoch}")
            if self.agent.name not in plan.ranks:
                raise errors.ConfigError(
                    f"{self.agent.name!r} is not a rank of the plan of epoch {plan.epoch}"
                )
            if len(plan.ranks) > self._slots.world:
                raise errors.ConfigError(
                    f"{len(plan.ranks)} ranks, but slots for {self._slots.world} (make a new Exchange)"
                )
            self._plan, self._dead, self._reported, self._late = plan, set(), frozenset(), set()
            self._slots.forget_all()  # peers may have restarted: their regions are asked again
            self._lock.notify_all()

    @property
    def masked(self) -> frozenset[str]:
        """Ranks masked for the current epoch."""
        with self._lock:
            return frozenset(self._dead)

    def mask(self, rank: str) -> None:
        """Mask `rank` for the current epoch now, as known dead (say, membership removed it):
        steps in flight send its tokens to surviving replicas without waiting for a deadline."""
        with self._lock:
            if rank != self.agent.name and rank not in self._dead:
                log.warning("%s: masking %s for epoch %d (gone)", self.agent.name, rank, self._plan.epoch)
                self._dead.add(rank)
            self._lock.notify_all()

    def _peer_lost(self, name: str, _generation: int, exc: errors.WeftError) -> None:
        if not self._closed.is_set() and name in self._plan.ranks:
            log.info("%s: the fabric lost %s: %s", self.agent.name, name, exc)
            self.mask(name)

    def _alive(self, peer: str) -> bool:
        """Whether the data path to `peer` is up: the agent knows it (membership has not
        removed it) and has not lost it."""
        try:
            return self.agent.peer_alive(peer)
        except errors.WeftError:  # unknown (removed) or this agent closed
            return False

    # -- the caller's side -----------------------------------------------------------------
    def dispatch(self, x: Any, expert_ids: npt.ArrayLike) -> step_mod.Dispatched:
        """Send each row of `x` to a live rank hosting its expert.

        Args:
            x: activations [n, hidden] of the exchange's dtype: numpy, or a C-contiguous CUDA
                array such as CuPy's (it goes through host memory, one copy each way, and
                `combine` then returns a CUDA array).
            expert_ids: the expert of each row.

        Returns:
            The step in flight, for `combine`.

        Raises:
            InvalidBufferError: shapes or dtype do not fit, or a peer would get more than
                `max_tokens` tokens.
        """
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
        with self._lock:
            self._step += 1
            plan, masked = self._plan, set(self._dead)
            self._box.open.add((plan.epoch, self._step))
            d = step_mod.Dispatched.start(plan, self._step, np.ascontiguousarray(x), ids)
            d.masked_before = self._reported
            self._late -= self._box.heard | self._dead
            self._box.heard.clear()
            d.stragglers.extend(sorted(self._late))  # a rank frozen last step is not waited for again
        d.on_device = on_device
        self._send(d, step_mod.resend(d, masked))
        return d

    def _send(self, d: step_mod.Dispatched, routes: dict[str, np.ndarray]) -> None:
        """Post one round: a batch per peer in `routes`; this rank's own tokens computed here."""
        me, round_ = self.agent.name, d.next_round
        if round_:
            d.redispatched += sum(len(t) for t in routes.values())
        d.next_round += 1
        for peer, idx in routes.items():
            if len(idx) > self.max_tokens:
                raise errors.InvalidBufferError(
                    f"{len(idx)} tokens for {peer}: more than max_tokens {self.max_tokens}"
                )
            if peer == me:  # our own experts: no wire
                d.out[idx] = serve.compute(self.expert_fn, d.expert_ids[idx], d.x[idx])
                d.done[idx] = True
                continue
            slot, my_rank = d.plan.ranks.index(peer), d.plan.ranks.index(me)
            head = wire.SlotHeader(d.epoch, d.step, my_rank, len(idx), round_)
            nbytes = self._slots.pack(self._slots.staging, slot, head, d.expert_ids[idx], d.x[idx])
            note = wire.Note(wire.DISPATCH, d.epoch, d.step, my_rank, len(idx), round_).encode()
            step_mod.sent(d, peer, idx, round_, time.monotonic())
            try:
                d.transfers[peer] = self._slots.post(
                    self._slots.staging, slots.INBOX, peer, (slot, my_rank), nbytes, note
                )
            except errors.WeftError as exc:
                log.info("%s: dispatch to %s failed: %s", me, peer, exc)
                d.lost[peer] = exc

    def combine(self, d: step_mod.Dispatched, timeout: float | None = None) -> step_mod.Combined:
        """Gather the results of `d` in token order, sending what masked ranks and stragglers
        held to surviving replicas.

        Args:
            d: what `dispatch` returned.
            timeout: seconds to give up after (default: no bound but the deadlines).

        Returns:
            The rows in token order, the tokens missing, the ranks masked and the stragglers.

        Raises:
            EpochMismatchError: a peer is on another epoch (the step does not mix plans).
            TimeoutError: `timeout` ran out.
        """
        give_up = None if timeout is None else time.monotonic() + timeout
        try:
            while not d.finished:
                with self._lock:
                    masked, plan = self._look(d)
                    routes = step_mod.resend(d, masked)
                    if routes and plan.epoch != d.epoch:
                        raise wire.EpochMismatchError(
                            f"the plan moved to epoch {plan.epoch} during step {d.step} of {d.epoch}"
                        )
                    if not routes and not d.finished:
                        self._lock.wait(self._wait(d, give_up))
                if routes:
                    self._send(d, routes)
                if give_up is not None and time.monotonic() > give_up and not d.finished:
                    raise TimeoutError(f"step {d.step}: no answer from {sorted(d.pending)}")
        finally:
            self._forget(d)
        with self._lock:
            step_mod.note_masked(d, self._dead)
            self._reported = frozenset(self._dead)
            self._late |= {p for p in d.stragglers if p in d.pending}  # never answered this step
        out = _to_device(d.out) if d.on_device else d.out
        return step_mod.Combined(out, d.missing, tuple(d.masked), d.redispatched, tuple(d.stragglers))

    def step(self, x: Any, expert_ids: npt.ArrayLike) -> step_mod.Combined:
        """``combine(dispatch(x, expert_ids))``."""
        return self.combine(self.dispatch(x, expert_ids))

    def _look(self, d: step_mod.Dispatched) -> tuple[set[str], plan_mod.EpPlan]:
        """Under the lock: take what arrived for `d`, then mask the dead, send again what
        failed, and mark the stragglers. Returns the masked ranks and the current plan."""
        box = self._box
        for peer in list(d.pending):
            rejected = box.rejected.pop((d.epoch, d.step, peer), None)
            if rejected is not None and rejected.code in (wire.Reject.STALE, wire.Reject.AHEAD):
                raise wire.EpochMismatchError(
                    f"{peer} refused step {d.step} of epoch {d.epoch}: {rejected.code.name} {rejected.reason}"
                )
            if rejected is not None and rejected.round == d.rounds[peer]:  # alive: send it again
                log.info("%s: %s refused step %d: %s", self.agent.name, peer, d.step, rejected.reason)
                step_mod.fail(d, peer)
                continue
            key = (d.epoch, d.step, peer, d.rounds[peer])
            if key in box.acks:
                d.acked.add(peer)
            got = box.arrived.pop(key, None)
            if got is not None:
                self._take(d, peer, got)
        for p in list(d.pending):
            broke = d.lost.get(p) or _error(d.transfers.get(p))
            if p in self._dead or _gone(broke) or not self._alive(p):
                if p not in self._dead:
                    log.warning(
                        "%s: masking %s for epoch %d (the data path lost it)", self.agent.name, p, d.epoch
                    )
                    self._dead.add(p)
                step_mod.drop(d, p)
            elif broke is not None:
                log.info("%s: the batch of step %d to %s failed; sent again", self.agent.name, d.step, p)
                step_mod.fail(d, p)
        for p in step_mod.overdue(d, time.monotonic(), self.deadline):
            log.info(
                "%s: %s is late in step %d (%s): its tokens go to replicas too",
                self.agent.name,
                p,
                d.step,
                "acknowledged" if p in d.acked else "not acknowledged yet",
            )
            d.stragglers.append(p)
        return set(self._dead), self._plan

    def _wait(self, d: step_mod.Dispatched, give_up: float | None) -> float:
        now = time.monotonic()
        wake = step_mod.next_wake(d, self.deadline)
        wait = 0.05 if wake is None else min(0.05, wake - now)
        if give_up is not None:
            wait = min(wait, give_up - now)
        return max(0.0, wait)

    def _take(self, d: step_mod.Dispatched, peer: str, tokens: int) -> None:
        """`peer`'s results, read only if its results slot holds them before and after the
        rows are copied (a late WRITE of an earlier batch could land there); otherwise the
        batch counts as failed and its tokens are sent again."""
        idx = d.pending[peer]
        slot = d.plan.ranks.index(peer)
        want = wire.SlotHeader(d.epoch, d.step, slot, len(idx), d.rounds[peer])
        results = self._slots.results
        rows = None
        if tokens == len(idx) and self._slots.header(results, slot) == want:
            rows = self._slots.rows(results, slot, len(idx)).copy()
        if rows is None or self._slots.header(results, slot) != want:
            log.warning("%s: results of %s do not match step %d: sent again", self.agent.name, peer, d.step)
            step_mod.fail(d, peer)
            return
        step_mod.take(d, peer, rows)

    def _forget(self, d: step_mod.Dispatched) -> None:
        with self._lock:
            self._box.forget(d.epoch, d.step)

    # -- notifications -----------------------------------------------------------------------
    def _pump_loop(self) -> None:
        while not self._closed.is_set():
            try:
                n = self.agent.take_notification(0.1)
            except errors.NotificationTimeoutError:
                continue
            except errors.AgentClosedError:
                return
            try:
                self._box.deliver(n.peer, n.message)
            except Exception:  # nothing a peer sends may end the notification thread
                log.exception("%s: message from %s", self.agent.name, n.peer)

    def _serve(self, peer: str, note: wire.Note) -> None:
        """A batch from `peer`: acknowledged at once (a sign of life), then queued to serve."""
        ack = wire.Note(wire.ACK, note.epoch, note.step, note.rank, note.tokens, note.round)
        with serve.quiet():
            self.agent.send_notification(peer, ack.encode())
        self._server.submit(serve.Batch(peer, note.epoch, note.step, note.rank, note.tokens, note.round))

    def close(self) -> None:
        """Stop serving and release the slots (the agent stays open)."""
        self._closed.set()
        self._pump.join(5)
        self._server.close()
        self._slots.release()


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


def _error(t: Transfer | None) -> Exception | None:
    """Why `t` failed, or None while it runs or once it succeeded."""
    if t is None or not t.done() or t.state is not TransferState.ERROR:
        return None
    return t.error if t.error is not None else errors.TransferError("failed")


def _gone(exc: Exception | None) -> bool:
    """Whether a failed transfer says its peer is gone (not merely fenced, slow or refusing)."""
    lost = (errors.PeerLostError, errors.UnknownPeerError, errors.AgentClosedError)
    return isinstance(exc, lost) and not isinstance(exc, errors.PeerFencedError)
