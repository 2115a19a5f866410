"""weft.kvstore: LMCache-compatible KV-cache offload to storage tiers (issue 5, in progress)."""

from weft.kvstore.config import LMCacheConfig, NixlBackend, ObjParams, load_lmcache_config
from weft.kvstore.store import KVStore

__all__ = ["KVStore", "LMCacheConfig", "NixlBackend", "ObjParams", "load_lmcache_config"]
