"""weft.ep: expert-parallel token dispatch and combine over the fabric, epoch-aware and
elastic (a rank that does not answer is masked and its tokens go to surviving replicas)."""

from weft.ep.exchange import (
    Combined,
    Dispatched,
    EpError,
    EpochMismatchError,
    EpPlan,
    Exchange,
    ExpertFn,
)

__all__ = ["Combined", "Dispatched", "EpError", "EpPlan", "EpochMismatchError", "Exchange", "ExpertFn"]
