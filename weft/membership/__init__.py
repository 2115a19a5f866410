"""weft.membership: the control plane's view of the group, kept in etcd."""

from weft.membership.client import GroupClient
from weft.membership.etcdserver import EtcdServer, EtcdStartError, EtcdTLS
from weft.membership.status import (
    GroupStatus,
    InvalidRecord,
    MemberStatus,
    PlanStatus,
    read_group_status,
)

__all__ = [
    "EtcdServer",
    "EtcdStartError",
    "EtcdTLS",
    "GroupClient",
    "GroupStatus",
    "InvalidRecord",
    "MemberStatus",
    "PlanStatus",
    "read_group_status",
]
