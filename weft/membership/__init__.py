"""weft.membership: the control plane's view of the group, kept in etcd."""

from weft.membership.errors import EtcdError, MembershipError
from weft.membership.etcdserver import EtcdServer, EtcdStartError, EtcdTLS
from weft.membership.events import EventKind, MembershipEvent
from weft.membership.keyspace import KeyKind, Keyspace
from weft.membership.member import MemberConfig, Membership, Phase
from weft.membership.port import FabricPort
from weft.membership.view import GroupView, Member

__all__ = ["EtcdServer", "EtcdStartError", "EtcdTLS"]
__all__ += [
    "EtcdError",
    "EventKind",
    "FabricPort",
    "GroupView",
    "KeyKind",
    "Keyspace",
    "Member",
    "MemberConfig",
    "Membership",
    "MembershipError",
    "MembershipEvent",
    "Phase",
]
