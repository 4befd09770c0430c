"""Python client for shoal: `ShoalClient` (blocking) and `AsyncShoalClient` (asyncio).

    from client import ShoalClient

    with ShoalClient("127.0.0.1:50051") as shoal:
        for chunk in shoal.generate("Once upon a time", max_new_tokens=32):
            print(chunk.text, end="", flush=True)

Results are plain dataclasses (Chunk, Completion, Stats, ModelInfo); failed calls raise
ShoalError, a grpc.RpcError whose `.code` / `.details` are attributes.
"""

from client.aio import AsyncShoalClient
from client.channel import channel_credentials, channel_target
from client.errors import ShoalError
from client.request import build_request, parse_priority
from client.sync import DEFAULT_TARGET, ShoalClient
from client.types import (
    Chunk,
    Completion,
    ModelInfo,
    Stats,
    Timing,
    TokenLogprob,
    TopLogprob,
    Usage,
    WorkerStats,
)

__all__ = [
    "DEFAULT_TARGET",
    "AsyncShoalClient",
    "Chunk",
    "Completion",
    "ModelInfo",
    "ShoalClient",
    "ShoalError",
    "Stats",
    "Timing",
    "TokenLogprob",
    "TopLogprob",
    "Usage",
    "WorkerStats",
    "build_request",
    "channel_credentials",
    "channel_target",
    "parse_priority",
]
