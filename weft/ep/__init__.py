"""weft.ep: expert-parallel token dispatch and combine over the fabric, epoch-aware and
elastic: a rank the group sees dead is masked at once and its tokens go to surviving
replicas; a rank that is alive but late has its tokens sent to a replica for that step only,
so a token goes missing only when no replica of its expert is alive."""

from weft.ep.exchange import Exchange
from weft.ep.plan import EpPlan, ExpertFn, route
from weft.ep.step import Combined, Dispatched
from weft.ep.wire import EpError, EpochMismatchError, MalformedMessageError

__all__ = [
    "Combined",
    "Dispatched",
    "EpError",
    "EpPlan",
    "EpochMismatchError",
    "Exchange",
    "ExpertFn",
    "MalformedMessageError",
    "route",
]
