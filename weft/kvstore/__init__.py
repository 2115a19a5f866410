"""weft.kvstore: LMCache-compatible KV-cache offload to storage tiers."""

from weft.api.storage import ObjParams
from weft.kvstore.config import LMCacheConfig, NixlBackend, load_lmcache_config
from weft.kvstore.store import KVStore

__all__ = ["KVStore", "LMCacheConfig", "NixlBackend", "ObjParams", "load_lmcache_config"]
