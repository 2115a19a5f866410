"""weft.membership: the control plane's view of the group, kept in etcd."""

from weft.membership.client import GroupClient, read_group_status
from weft.membership.status import GroupStatus, InvalidRecord, MemberStatus, PlanStatus

__all__ = [
    "GroupClient",
    "GroupStatus",
    "InvalidRecord",
    "MemberStatus",
    "PlanStatus",
    "read_group_status",
]
