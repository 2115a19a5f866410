from __future__ import annotations

from pathlib import Path

import pytest

from weft import AgentConfig, ConfigError
from weft.api.agent_settings import AgentSettings, resolve_settings
from weft.fabric.types import Backend


def test_backends_parse_and_dedupe() -> None:
    cfg = AgentConfig(["TCP", "local", "tcp"])
    assert cfg.backends == (Backend.TCP, Backend.LOCAL)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"backends": ["rdma"]}, "unknown backend"),
        ({"backends": "tcp"}, "not a string"),
        ({"backends": []}, "at least one"),
        ({"secret": b"short"}, "16 bytes"),
        ({"transfer_timeout": 0}, "transfer_timeout"),
        ({"listen_port": 70000}, "listen_port"),
        ({"local_workers": 0}, "local_workers"),
        ({"max_unauthenticated": 0}, "max_unauthenticated"),
        ({"max_staging_bytes": 0}, "max_staging_bytes"),
        ({"staging_timeout": -1.0}, "staging_timeout"),
        ({"inbox_full_timeout": 0}, "inbox_full_timeout"),
        (
            {"max_pending_notification_bytes": 100, "max_notification_bytes": 200},
            "max_pending_notification_bytes",
        ),
    ],
)
def test_bad_config_is_typed(kwargs: dict[str, object], match: str) -> None:
    backends = kwargs.pop("backends", ["tcp"])
    with pytest.raises(ConfigError, match=match):
        AgentConfig(backends, **kwargs)  # type: ignore[arg-type]


def test_from_settings_and_replace() -> None:
    env = {"WEFT_NAME": "a", "WEFT_GROUP": "g", "WEFT_ETCD": "http://127.0.0.1:2379", "WEFT_BACKENDS": "tcp"}
    env |= {"WEFT_SECRET": "x" * 20, "WEFT_LISTEN_PORT": "0"}
    cfg = AgentConfig.from_settings(resolve_settings(AgentSettings, env=env))
    assert cfg.backends == (Backend.TCP,) and cfg.listen_port == 0 and cfg.secret == b"x" * 20
    assert "secret" not in repr(cfg) or "xxxx" not in repr(cfg)
    assert cfg.replace(transfer_timeout=2.5).transfer_timeout == 2.5
    with pytest.raises(ConfigError, match="WEFT_LISTEN_PORT"):
        resolve_settings(AgentSettings, env=env | {"WEFT_LISTEN_PORT": "http"})


def test_the_data_path_bounds_come_from_the_settings(tmp_path: Path) -> None:
    env = {"WEFT_NAME": "a", "WEFT_GROUP": "g", "WEFT_ETCD": "http://127.0.0.1:2379", "WEFT_SECRET": "x" * 20}
    default = AgentConfig.from_settings(resolve_settings(AgentSettings, env=env))
    assert default.max_unauthenticated == AgentConfig().max_unauthenticated
    env |= {"WEFT_MAX_UNAUTHENTICATED": "8", "WEFT_MAX_PENDING_NOTIFICATIONS": "4"}
    cfg = AgentConfig.from_settings(resolve_settings(AgentSettings, env=env))
    assert cfg.max_unauthenticated == 8 and cfg.max_pending_notifications == 4
    file = tmp_path / "agent.yaml"
    file.write_text("limits:\n  max_staging_bytes: 16777216\n  max_descriptors: 1024\n")
    cfg = AgentConfig.from_settings(resolve_settings(AgentSettings, config_file=file, env=env))
    assert cfg.max_staging_bytes == 16 << 20 and cfg.max_descriptors == 1024 and cfg.max_unauthenticated == 8
    with pytest.raises(ConfigError, match="WEFT_MAX_UNAUTHENTICATED"):
        resolve_settings(AgentSettings, env=env | {"WEFT_MAX_UNAUTHENTICATED": "0"})
    with pytest.raises(ConfigError, match="max_pending_notification_bytes"):
        small = {"WEFT_MAX_NOTIFICATION_BYTES": "2048", "WEFT_MAX_PENDING_NOTIFICATION_BYTES": "1024"}
        resolve_settings(AgentSettings, env=env | small)
