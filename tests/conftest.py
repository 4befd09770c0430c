"""Shared fixtures: a real checkpoint on disk and processors built from it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from worker.batch_processor import BatchProcessor
from worker.channel.types import EngineConfig
from worker.random_checkpoint import write_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"


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
