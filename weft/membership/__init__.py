"""weft.membership: the control plane's view of the group, kept in etcd."""

__all__: list[str] = []
