"""Shared fixtures: a real checkpoint on disk, processors built from it, tokenizers, servers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from service_harness import ServerGroup
from tokenizers import Tokenizer

from worker.batch_processor import BatchProcessor
from worker.channel.types import EngineConfig
from worker.random_checkpoint import write_checkpoint
from worker.toy_tokenizer import build_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
TOY_VOCAB = 512  # the toy tokenizer's vocabulary, as in the `default` preset


@pytest.fixture(scope="session")
def default_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `default` preset: 4 layers, GQA 8/2, tied head, written by worker.random_checkpoint."""
    return write_checkpoint(tmp_path_factory.mktemp("models") / "default", "default")


@pytest.fixture
def make_processor(default_model: Path) -> Callable[..., BatchProcessor]:
    def make(model_dir: Path = default_model, **overrides: object) -> BatchProcessor:
        config = dict(max_batch_size=8, kv_cache_mb=8, prefill_token_budget=32, device="cpu")
        config.update(overrides)
        return BatchProcessor.from_model_dir(model_dir, EngineConfig(**config))  # type: ignore[arg-type]

    return make


# -- tokenizers (read-only: do not change their settings in a test) ---------------------
@pytest.fixture(scope="session")
def toy_tokenizer() -> Tokenizer:
    """worker/toy_tokenizer.py's byte-level BPE, 512 ids (no checkpoint needed)."""
    return build_tokenizer(TOY_VOCAB)


@pytest.fixture(scope="session")
def model_tokenizer(default_model: Path) -> Tokenizer:
    """The tokenizer of `default_model`, read from its tokenizer.json as the server reads it."""
    return Tokenizer.from_file(str(default_model / "tokenizer.json"))


# -- servers: `python -m server` on loopback, stopped and checked at teardown ---------------
@pytest.fixture
def servers(default_model: Path, tmp_path: Path) -> Iterator[ServerGroup]:
    """Start servers for one test with `servers.start(*flags, log="name.log")`.

    At teardown each is sent SIGTERM and must exit with status 0, leaving no
    shared-memory segment behind.
    """
    group = ServerGroup(default_model, tmp_path)
    yield group
    group.stop_all()


@pytest.fixture(scope="module")
def module_servers(
    default_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerGroup]:
    """`servers` for the servers a whole test module shares (its `server` fixture)."""
    group = ServerGroup(default_model, tmp_path_factory.mktemp("servers"))
    yield group
    group.stop_all()
