"""weft.membership: the control plane's view of the group, kept in etcd."""

from weft.membership.etcdserver import EtcdServer, EtcdStartError, EtcdTLS

__all__ = ["EtcdServer", "EtcdStartError", "EtcdTLS"]
