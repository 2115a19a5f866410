"""weft.kvstore: LMCache-compatible KV-cache offload to storage tiers."""

from weft.api.errors import BatchError, InvalidKeyError, StorageError, StorageFullError
from weft.api.storage import ObjParams
from weft.fabric.errors import InvalidBufferError
from weft.kvstore.config import LMCacheConfig, NixlBackend, load_lmcache_config
from weft.kvstore.store import Key, KVStore, key_of

__all__ = [
    "BatchError",
    "InvalidBufferError",
    "InvalidKeyError",
    "KVStore",
    "Key",
    "LMCacheConfig",
    "NixlBackend",
    "ObjParams",
    "StorageError",
    "StorageFullError",
    "key_of",
    "load_lmcache_config",
]
