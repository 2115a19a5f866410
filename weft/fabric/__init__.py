"""weft.fabric: the data plane. Move bytes between the memories of processes.

from weft import Agent, AgentConfig, Op
agent = Agent("a", AgentConfig(backends=["local", "tcp"], secret=b"..."))
"""

from weft.fabric._cuda import gpu_available
from weft.fabric.agent import Agent
from weft.fabric.config import AgentConfig
from weft.fabric.errors import (
    AgentClosedError,
    AuthenticationError,
    BackendUnavailableError,
    ConfigError,
    DeviceUnavailableError,
    FencedError,
    InboxFullError,
    InvalidBufferError,
    InvalidDescriptorError,
    LimitError,
    MetadataError,
    NotificationTimeoutError,
    PeerFencedError,
    PeerLostError,
    ProtocolError,
    RegistrationError,
    RemoteError,
    StalePeerError,
    StorageError,
    TransferCancelledError,
    TransferError,
    TransferTimeoutError,
    UnknownPeerError,
    UnknownRegionError,
    WeftError,
)
from weft.fabric.limits import LimitsHit
from weft.fabric.memory import DescList, Registration, RemoteRegion
from weft.fabric.notify import Notification
from weft.fabric.storage import FileRegion, ObjectRegion, StorageInfo
from weft.fabric.transfer import PreparedTransfer, Transfer
from weft.fabric.types import Backend, MemoryKind, Op, TransferState

__all__ = [
    "Agent",
    "AgentClosedError",
    "AgentConfig",
    "AuthenticationError",
    "Backend",
    "BackendUnavailableError",
    "ConfigError",
    "DescList",
    "DeviceUnavailableError",
    "FencedError",
    "FileRegion",
    "InboxFullError",
    "InvalidBufferError",
    "InvalidDescriptorError",
    "LimitError",
    "LimitsHit",
    "MemoryKind",
    "MetadataError",
    "Notification",
    "NotificationTimeoutError",
    "ObjectRegion",
    "Op",
    "PeerFencedError",
    "PeerLostError",
    "PreparedTransfer",
    "ProtocolError",
    "Registration",
    "RegistrationError",
    "RemoteError",
    "RemoteRegion",
    "StalePeerError",
    "StorageError",
    "StorageInfo",
    "Transfer",
    "TransferCancelledError",
    "TransferError",
    "TransferState",
    "TransferTimeoutError",
    "UnknownPeerError",
    "UnknownRegionError",
    "WeftError",
    "gpu_available",
]
