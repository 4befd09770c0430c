"""ServerConfig: the front process's validated settings, built once at start.

Every setting comes from a command-line flag, else an environment variable, else
the default below (flags override env, env overrides defaults).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from server.validation import MAX_PROMPT_BYTES
from worker.channel.types import DEFAULT_KV_CACHE_MB, EngineConfig

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
MAX_PORT = 65535
# The HTTP API's body limit: a prompt of max_prompt_bytes written with \uXXXX escapes (as
# ensure_ascii encoders such as Python's json write non-ASCII text: up to 3x its UTF-8
# size) and the rest of the body still fit; 4 MiB, as a gRPC request message.
DEFAULT_MAX_BODY_BYTES = 4 * MAX_PROMPT_BYTES
MIN_BODY_BYTES = 1024  # below this no real request fits: a mistaken unit, refused at start

# field -> (environment variable, help). The flag is `--` + the field name with dashes.
_OPTIONS: dict[str, tuple[str, str]] = {
    "model": ("MODEL", "model directory (config.json, *.safetensors, tokenizer.json)"),
    "host": ("HOST", "address to listen on"),
    "port": ("PORT", "gRPC port (0 = pick a free one)"),
    "http_port": ("HTTP_PORT", "OpenAI-compatible HTTP API and chat page port (0 = off)"),
    "served_model_name": (
        "SERVED_MODEL_NAME",
        "model id of the HTTP API (default: the model's file or directory name)",
    ),
    "max_body_bytes": (
        "MAX_BODY_BYTES",
        "largest HTTP request body, bytes; larger ones get 413 before any parsing",
    ),
    "workers": ("NUM_WORKERS", "worker processes"),
    "device": ("DEVICE", "auto, cpu or cuda"),
    "max_batch_size": ("BATCH_SIZE", "running sequences per worker"),
    "max_queue_len": ("MAX_QUEUE_LEN", "pending requests before RESOURCE_EXHAUSTED"),
    "kv_cache_mb": ("KV_CACHE_MB", "KV cache budget per worker, MiB"),
    "metrics_port": ("METRICS_PORT", "Prometheus metrics port (0 = off)"),
    "prefill_token_budget": ("PREFILL_TOKEN_BUDGET", "prompt tokens per engine step"),
    "num_speculative_tokens": (
        "NUM_SPECULATIVE_TOKENS",
        "speculative decoding: draft tokens verified per sequence per step (0 = off)",
    ),
    "speculative_method": (
        "SPECULATIVE_METHOD",
        "ngram (prompt lookup) or draft (--draft-model); default: draft if --draft-model is set",
    ),
    "draft_model": ("DRAFT_MODEL", "draft model for speculative decoding (same tokenizer)"),
    "prompt_lookup_max": ("PROMPT_LOOKUP_MAX", "prompt lookup: longest n-gram matched"),
    "prompt_lookup_min": ("PROMPT_LOOKUP_MIN", "prompt lookup: shortest n-gram matched"),
    "batch_invariant": (
        "BATCH_INVARIANT",
        "a request's logits bitwise independent of the batch (costs a lone request's speed)",
    ),
    "prefix_caching": (
        "PREFIX_CACHING",
        "keep and share the KV blocks of equal prompt prefixes (--no-prefix-caching: off)",
    ),
    "max_new_tokens_limit": ("MAX_NEW_TOKENS_LIMIT", "largest max_new_tokens accepted"),
    "batch_timeout_ms": ("BATCH_TIMEOUT_MS", "batching window while a worker is idle, ms"),
    "aging_s": ("AGING_S", "a queued request moves up one priority class per this many s"),
    "retention_s": ("RETENTION_S", "seconds a finished result is kept for replay"),
    "retention_count": ("RETENTION_COUNT", "finished results kept for replay"),
    "retention_mb": ("RETENTION_MB", "MiB of finished results' text and tokens kept for replay"),
    "drain_grace_s": ("DRAIN_GRACE_S", "seconds running requests get on shutdown"),
    "max_resumptions": (
        "MAX_RESUMPTIONS",
        "a request on a worker at this many deaths in a row fails (1 = never resume one)",
    ),
    "ring_mb": ("RING_MB", "shared-memory ring per direction, MiB"),
    "auth_token": ("AUTH_TOKEN", "bearer token clients must send (empty = auth off)"),
    "tls_cert": ("TLS_CERT", "TLS: the server's certificate chain, PEM (with --tls-key)"),
    "tls_key": ("TLS_KEY", "TLS: the server's private key, PEM (with --tls-cert)"),
    "tls_client_ca": ("TLS_CLIENT_CA", "mutual TLS: CA that client certificates must chain to"),
    "log_level": ("LOG_LEVEL", "DEBUG, INFO, WARNING, ERROR or CRITICAL"),
    "log_format": ("LOG_FORMAT", "text (readable) or json (one object per line)"),
}


@dataclass(frozen=True)
class ServerConfig:
    model: str
    host: str = "127.0.0.1"
    port: int = 50051
    http_port: int = 8000  # 0 = no HTTP API
    served_model_name: str = ""
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    workers: int = 1
    device: str = "auto"
    max_batch_size: int = 32
    max_queue_len: int = 1024
    kv_cache_mb: float = DEFAULT_KV_CACHE_MB
    metrics_port: int = 0  # 0 = no metrics endpoint
    prefill_token_budget: int = 512
    num_speculative_tokens: int = 0
    speculative_method: str = ""
    draft_model: str = ""
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    batch_invariant: bool = False
    prefix_caching: bool = True
    max_new_tokens_limit: int = 4096
    batch_timeout_ms: float = 5.0
    aging_s: float = 10.0
    retention_s: float = 300.0
    retention_count: int = 10000
    retention_mb: float = 256.0
    drain_grace_s: float = 30.0
    max_resumptions: int = 3
    ring_mb: int = 4
    auth_token: str = field(default="", repr=False)  # a secret: kept out of logs
    tls_cert: str = ""  # TLS on gRPC and HTTP when set (with tls_key)
    tls_key: str = ""
    tls_client_ca: str = ""  # and mutual TLS when set
    log_level: str = "INFO"
    log_format: str = "text"

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError(_named("model", "must be set"))
        if not self.host:
            raise ValueError(_named("host", "must not be empty"))
        for name in ("port", "http_port", "metrics_port"):
            _check(name, getattr(self, name), lambda v: 0 <= v <= MAX_PORT, f"in [0, {MAX_PORT}]")
        at_least_one = ("workers", "max_queue_len", "max_new_tokens_limit", "ring_mb")
        for name in (*at_least_one, "max_resumptions"):
            _check(name, getattr(self, name), lambda v: v >= 1, ">= 1")
        _check("aging_s", self.aging_s, lambda v: v > 0, "> 0")
        for name in ("batch_timeout_ms", "retention_s", "retention_count", "retention_mb"):
            _check(name, getattr(self, name), lambda v: v >= 0, ">= 0")
        _check("drain_grace_s", self.drain_grace_s, lambda v: v >= 0, ">= 0")
        _check("max_body_bytes", self.max_body_bytes, lambda v: v >= MIN_BODY_BYTES, ">= 1024")
        try:  # the engine's own fields are checked by EngineConfig, named here with their flag
            self.engine  # noqa: B018
        except ValueError as err:
            name, _, rule = str(err).partition(" ")
            raise ValueError(_named(name, rule)) from None
        if self.draft_model and not os.path.exists(self.draft_model):
            raise ValueError(
                _named(
                    "draft_model", f"must name an existing checkpoint (got {self.draft_model!r})"
                )
            )
        if self.log_level not in LOG_LEVELS:
            raise ValueError(_named("log_level", f"must be one of {', '.join(LOG_LEVELS)}"))
        if self.log_format not in LOG_FORMATS:
            raise ValueError(_named("log_format", f"must be one of {', '.join(LOG_FORMATS)}"))
        self._check_tls()
        ports = [
            ("port", self.port),
            ("http_port", self.http_port),
            ("metrics_port", self.metrics_port),
        ]
        for i, (name, value) in enumerate(ports):
            for other, taken in ports[:i]:
                if value and value == taken:
                    raise ValueError(_named(name, f"must differ from {other} (got {value})"))

    def _check_tls(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            given, missing = ("tls_cert", "tls_key") if self.tls_cert else ("tls_key", "tls_cert")
            raise ValueError(_named(missing, f"must be set with --{given.replace('_', '-')}"))
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError(_named("tls_client_ca", "needs --tls-cert and --tls-key"))
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ValueError(_named(name, f"must name an existing file (got {path!r})"))

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert)

    @property
    def engine(self) -> EngineConfig:
        """Each worker's engine settings."""
        return EngineConfig(
            max_batch_size=self.max_batch_size,
            kv_cache_mb=self.kv_cache_mb,
            prefill_token_budget=self.prefill_token_budget,
            device=self.device,
            num_speculative_tokens=self.num_speculative_tokens,
            speculative_method=self.speculative_method,
            draft_model=self.draft_model,
            prompt_lookup_max=self.prompt_lookup_max,
            prompt_lookup_min=self.prompt_lookup_min,
            batch_invariant=self.batch_invariant,
            prefix_caching=self.prefix_caching,
        )

    @property
    def retention_bytes(self) -> int:
        return int(self.retention_mb * (1 << 20))

    @property
    def ring_bytes(self) -> int:
        return self.ring_mb << 20

    @property
    def auth_enabled(self) -> bool:
        return bool(self.auth_token)

    @classmethod
    def from_args(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> ServerConfig:
        """Parse flags over env over defaults. Bad syntax exits (argparse); bad values raise."""
        argv = sys.argv[1:] if argv is None else argv
        environ = os.environ if environ is None else environ
        namespace = build_parser(environ).parse_args(list(argv))
        return cls(**vars(namespace))


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m server", description="shoal gRPC inference server"
    )
    for spec in dataclasses.fields(ServerConfig):
        env, text = _OPTIONS[spec.name]
        convert = _converter(spec.name, spec.type)
        kwargs: dict[str, Any] = {"dest": spec.name, "type": convert, "help": f"{text} (${env})"}
        if str(spec.type) == "bool":  # --name / --no-name; the env value is parsed strictly
            kwargs["action"] = argparse.BooleanOptionalAction
        if env in environ:
            # argparse runs `type` on string defaults, so a bad env value is reported too.
            kwargs["default"] = environ[env]
        elif spec.default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = spec.default
        parser.add_argument("--" + spec.name.replace("_", "-"), **kwargs)
    return parser


def _converter(name: str, annotation: object) -> Callable[[str], Any]:
    # Annotations are strings here (from __future__ import annotations).
    if name == "log_level":
        return str.upper
    if name == "log_format":
        return str.lower
    return {"int": int, "float": float, "bool": _boolean}.get(str(annotation), str)


def _boolean(text: str | bool) -> bool:
    if isinstance(text, bool):  # a flag's own default
        return text
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, 1/0, yes/no or on/off (got {text!r})")


def _named(name: str, rule: str) -> str:
    env = _OPTIONS[name][0]
    return f"{name} (--{name.replace('_', '-')} / ${env}) {rule}"


def _check(name: str, value: float, ok: Callable[[float], bool], rule: str) -> None:
    # NaN fails every comparison, so it is rejected by the same test.
    if not ok(value):
        raise ValueError(_named(name, f"must be {rule} (got {value!r})"))
