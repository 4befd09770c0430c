"""ServerConfig: flags over env over defaults, and every value checked at start."""

from __future__ import annotations

import dataclasses
import json

import pytest

from server.config import ServerConfig
from server.validation import MAX_PROMPT_BYTES


def test_defaults() -> None:
    config = ServerConfig.from_args(["--model", "m"], {})
    assert config == ServerConfig(model="m")
    assert (config.host, config.port, config.workers) == ("127.0.0.1", 50051, 1)
    assert config.device == "auto"
    assert (config.max_batch_size, config.max_queue_len, config.metrics_port) == (32, 1024, 0)
    assert config.ring_bytes == 4 << 20 and not config.auth_enabled


def test_env_overrides_defaults_and_flags_override_env() -> None:
    environ = {
        "MODEL": "/env/model",
        "PORT": "6000",
        "NUM_WORKERS": "3",
        "BATCH_SIZE": "8",
        "KV_CACHE_MB": "64.5",
        "AGING_S": "2.5",
        "AUTH_TOKEN": "secret",
        "LOG_LEVEL": "debug",
    }
    from_env = ServerConfig.from_args([], environ)
    assert from_env.model == "/env/model" and from_env.port == 6000 and from_env.workers == 3
    assert from_env.max_batch_size == 8 and from_env.kv_cache_mb == 64.5
    assert from_env.aging_s == 2.5 and from_env.log_level == "DEBUG" and from_env.auth_enabled
    assert from_env.max_queue_len == 1024  # not in env: the default

    argv = ["--model", "/flag/model", "--port", "7000", "--max-batch-size", "4", "--workers", "2"]
    from_flags = ServerConfig.from_args(argv, environ)
    assert from_flags.model == "/flag/model" and from_flags.port == 7000
    assert from_flags.max_batch_size == 4 and from_flags.workers == 2
    assert from_flags.kv_cache_mb == 64.5  # no flag: the env value stays


def test_every_field_has_a_flag_and_an_env_variable() -> None:
    flags = {
        "--host": "0.0.0.0",
        "--device": "cpu",
        "--max-queue-len": "5",
        "--metrics-port": "9100",
        "--prefill-token-budget": "64",
        "--max-new-tokens-limit": "100",
        "--batch-timeout-ms": "0",
        "--retention-s": "1",
        "--retention-count": "2",
        "--drain-grace-s": "3",
        "--ring-mb": "8",
        "--auth-token": "t",
        "--log-level": "warning",
    }
    argv = ["--model", "m"] + [part for item in flags.items() for part in item]
    config = ServerConfig.from_args(argv, {})
    assert config.host == "0.0.0.0" and config.device == "cpu" and config.max_queue_len == 5
    assert config.metrics_port == 9100 and config.prefill_token_budget == 64
    assert config.max_new_tokens_limit == 100 and config.batch_timeout_ms == 0
    assert (config.retention_s, config.retention_count, config.drain_grace_s) == (1, 2, 3)
    assert config.ring_bytes == 8 << 20 and config.log_level == "WARNING"
    environ = {
        "HOST": "::",
        "DEVICE": "cuda",
        "MAX_QUEUE_LEN": "6",
        "METRICS_PORT": "9101",
        "PREFILL_TOKEN_BUDGET": "65",
        "MAX_NEW_TOKENS_LIMIT": "101",
        "BATCH_TIMEOUT_MS": "1.5",
        "RETENTION_S": "4",
        "RETENTION_COUNT": "5",
        "DRAIN_GRACE_S": "6",
        "RING_MB": "1",
    }
    config = ServerConfig.from_args(["--model", "m"], environ)
    assert (config.host, config.device, config.max_queue_len, config.metrics_port) == (
        "::",
        "cuda",
        6,
        9101,
    )
    assert (config.prefill_token_budget, config.max_new_tokens_limit) == (65, 101)
    assert (config.batch_timeout_ms, config.retention_s, config.retention_count) == (1.5, 4, 5)
    assert (config.drain_grace_s, config.ring_mb) == (6, 1)


def test_prefix_caching_is_on_unless_turned_off_by_flag_or_env() -> None:
    assert ServerConfig.from_args(["--model", "m"], {}).engine.prefix_caching
    off = ServerConfig.from_args(["--model", "m", "--no-prefix-caching"], {})
    assert not off.prefix_caching and not off.engine.prefix_caching
    for value, expected in [("0", False), ("off", False), ("False", False), ("1", True)]:
        config = ServerConfig.from_args(["--model", "m"], {"PREFIX_CACHING": value})
        assert config.engine.prefix_caching is expected
    on = ServerConfig.from_args(["--model", "m", "--prefix-caching"], {"PREFIX_CACHING": "0"})
    assert on.prefix_caching  # the flag wins over the env
    with pytest.raises(SystemExit):
        ServerConfig.from_args(["--model", "m"], {"PREFIX_CACHING": "maybe"})


def test_model_is_required() -> None:
    with pytest.raises(SystemExit):
        ServerConfig.from_args([], {})


def test_unparsable_env_value_exits() -> None:
    with pytest.raises(SystemExit):
        ServerConfig.from_args(["--model", "m"], {"PORT": "fifty"})


def test_auth_token_is_not_in_repr() -> None:
    assert "secret" not in repr(ServerConfig(model="m", auth_token="secret"))


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("model", "", "model"),
        ("host", "", "host"),
        ("port", 70000, "65535"),
        ("port", -1, "65535"),
        ("metrics_port", 65536, "65535"),
        ("workers", 0, ">= 1"),
        ("max_batch_size", 0, "> 0"),
        ("max_queue_len", 0, ">= 1"),
        ("prefill_token_budget", 0, "> 0"),
        ("max_new_tokens_limit", 0, ">= 1"),
        ("kv_cache_mb", 0.0, "> 0"),
        ("kv_cache_mb", float("nan"), "> 0"),
        ("aging_s", 0.0, "> 0"),
        ("batch_timeout_ms", -1.0, ">= 0"),
        ("retention_s", -1.0, ">= 0"),
        ("retention_count", -1, ">= 0"),
        ("drain_grace_s", float("nan"), ">= 0"),
        ("ring_mb", 0, ">= 1"),
        ("max_body_bytes", 1023, ">= 1024"),  # a size in MiB given as bytes, say
        ("device", "tpu", "auto, cpu, cuda"),
        ("log_level", "LOUD", "INFO"),
    ],
)
def test_invalid_values_name_the_field_and_the_limit(
    field: str, value: object, expected: str
) -> None:
    with pytest.raises(ValueError, match=r"must") as info:
        dataclasses.replace(ServerConfig(model="m"), **{field: value})
    assert field in str(info.value) and expected in str(info.value)


def test_the_http_body_limit_leaves_room_for_the_largest_prompt() -> None:
    """--max-body-bytes / $MAX_BODY_BYTES; the default holds a max_prompt_bytes prompt
    written with \\uXXXX escapes (3x its UTF-8 size, at most) and the rest of a body."""
    default = ServerConfig(model="m").max_body_bytes
    assert default == 4 << 20 == 4 * MAX_PROMPT_BYTES
    for text in ("é", "🙂", "中"):  # 2, 4 and 3 UTF-8 bytes: 6, 12 and 6 escaped
        prompt = text * (MAX_PROMPT_BYTES // len(text.encode()))
        assert len(json.dumps({"model": "m", "prompt": prompt, "max_tokens": 16})) < default
    env = {"MAX_BODY_BYTES": "65536"}
    assert ServerConfig.from_args(["--model", "m"], env).max_body_bytes == 65536
    flags = ["--model", "m", "--max-body-bytes", "2048"]
    assert ServerConfig.from_args(flags, env).max_body_bytes == 2048
    with pytest.raises(ValueError, match=r"max_body_bytes \(--max-body-bytes / \$MAX_BODY_BYTES"):
        ServerConfig.from_args(["--model", "m", "--max-body-bytes", "4"], {})


def test_invalid_value_from_flags_raises() -> None:
    with pytest.raises(ValueError, match=r"max_batch_size \(--max-batch-size / \$BATCH_SIZE\)"):
        ServerConfig.from_args(["--model", "m", "--max-batch-size", "0"], {})
