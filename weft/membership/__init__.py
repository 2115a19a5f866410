"""weft.membership: the group's members, leader and plan, kept in etcd.

`Membership` is what an agent runs to be in a group; `GroupClient` is what a tool (the CLI,
the operator) uses to read a group and write the records it may write.
"""

from weft.membership.client import GroupClient, read_group_status
from weft.membership.errors import EtcdError, MembershipError
from weft.membership.events import EventKind, MembershipEvent
from weft.membership.keyspace import KeyKind, Keyspace
from weft.membership.member import MemberConfig, Membership, Phase
from weft.membership.port import FabricPort
from weft.membership.status import GroupStatus, InvalidRecord, MemberStatus, PlanStatus
from weft.membership.view import GroupView, Member

__all__ = [
    "EtcdError",
    "EventKind",
    "FabricPort",
    "GroupClient",
    "GroupStatus",
    "GroupView",
    "InvalidRecord",
    "KeyKind",
    "Keyspace",
    "Member",
    "MemberConfig",
    "MemberStatus",
    "Membership",
    "MembershipError",
    "MembershipEvent",
    "Phase",
    "PlanStatus",
    "read_group_status",
]
