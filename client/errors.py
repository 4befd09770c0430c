"""One error type for every failed call.

Every client method raises `ShoalError` when the server (or the channel) answers with a
non-OK status. It subclasses `grpc.RpcError`, so `except grpc.RpcError` keeps working, but
unlike grpc's own call objects `code` and `details` are plain attributes, not methods:

    try:
        client.generate_text("hi", max_new_tokens=0)
    except ShoalError as err:
        assert err.code is grpc.StatusCode.INVALID_ARGUMENT
        print(err.details)

The original grpc error stays reachable as `err.__cause__`.
"""

from __future__ import annotations

import grpc


class ShoalError(grpc.RpcError):
    """A failed shoal call: `code` is a grpc.StatusCode, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"

    @classmethod
    def from_rpc(cls, err: grpc.RpcError) -> ShoalError:
        """Wrap a grpc error (sync or aio); both expose code()/details() as methods."""
        if isinstance(err, ShoalError):
            return err
        code_fn = getattr(err, "code", None)
        details_fn = getattr(err, "details", None)
        code = code_fn() if callable(code_fn) else None
        details = details_fn() if callable(details_fn) else None
        return cls(code or grpc.StatusCode.UNKNOWN, details or str(err))
