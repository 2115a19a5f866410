"""weft: an elastic, resilient transfer fabric for distributed LLM inference.

The data plane (`weft.fabric`) is re-exported here::

    from weft import Agent, AgentConfig, MemoryKind, TransferState, WeftError
"""

from weft.fabric.agent import Agent
from weft.fabric.config import AgentConfig
from weft.fabric.errors import (
    AgentClosedError,
    AuthenticationError,
    BackendUnavailableError,
    ConfigError,
    DeviceUnavailableError,
    FencedError,
    InvalidBufferError,
    InvalidDescriptorError,
    MetadataError,
    NotificationTimeoutError,
    PeerFencedError,
    PeerLostError,
    ProtocolError,
    RegistrationError,
    RemoteError,
    StalePeerError,
    TransferCancelledError,
    TransferError,
    TransferTimeoutError,
    UnknownPeerError,
    UnknownRegionError,
    WeftError,
)
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
    "InvalidBufferError",
    "InvalidDescriptorError",
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
    "StorageInfo",
    "Transfer",
    "TransferCancelledError",
    "TransferError",
    "TransferState",
    "TransferTimeoutError",
    "UnknownPeerError",
    "UnknownRegionError",
    "WeftError",
]

__version__ = "0.1.0"
