"""Server reflection under both names, v1 and v1alpha (server/reflection.py).

Each version is called as a client of that version would: a raw bidirectional stream on
`/grpc.reflection.<version>.ServerReflection/ServerReflectionInfo` with that package's own
message classes (v1's built from the v1 descriptor the server adds to the pool), listing the
services and describing `shoal.v1.Inference` the way grpcurl's `describe` does
(file_containing_symbol, then the FileDescriptorProto it answers).
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha

from server.reflection import V1_FILE, V1_SERVICE, V1ALPHA_SERVICE, enable_reflection, v1_file
from shoal.v1 import inference_pb2 as pb

INFERENCE = pb.DESCRIPTOR.services_by_name["Inference"].full_name


def classes(version: str) -> tuple[Any, Any]:
    """(ServerReflectionRequest, ServerReflectionResponse) of grpc.reflection.<version>."""
    if version == "v1alpha":
        return v1alpha.ServerReflectionRequest, v1alpha.ServerReflectionResponse
    v1_file()
    pool = descriptor_pool.Default()
    return tuple(  # type: ignore[return-value]
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"grpc.reflection.v1.{n}"))
        for n in ("ServerReflectionRequest", "ServerReflectionResponse")
    )


async def ask(version: str, requests: list[dict[str, Any]]) -> list[Any]:
    """Start a server with reflection only, send `requests` on one stream, return the answers."""
    server = grpc.aio.server()
    enable_reflection((INFERENCE, health.SERVICE_NAME), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    request_cls, response_cls = classes(version)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_stream(
                f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                request_serializer=request_cls.SerializeToString,
                response_deserializer=response_cls.FromString,
            )
            stream = call(iter([request_cls(**r) for r in requests]), timeout=10)
            return [answer async for answer in stream]
    finally:
        await server.stop(None)


def describe(answer: Any) -> descriptor_pb2.FileDescriptorProto:
    (raw,) = answer.file_descriptor_response.file_descriptor_proto
    return descriptor_pb2.FileDescriptorProto.FromString(raw)


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_each_version_lists_services_and_describes_inference(version: str) -> None:
    listed, inference, itself, missing = asyncio.run(
        ask(
            version,
            [
                {"list_services": ""},
                {"file_containing_symbol": INFERENCE},
                {"file_containing_symbol": f"grpc.reflection.{version}.ServerReflection"},
                {"file_containing_symbol": "shoal.v1.Nope"},
            ],
        )
    )
    names = {s.name for s in listed.list_services_response.service}
    assert names == {INFERENCE, health.SERVICE_NAME, V1_SERVICE, V1ALPHA_SERVICE}

    proto = describe(inference)  # what `grpcurl describe shoal.v1.Inference` prints from
    assert proto.name == "shoal/v1/inference.proto" and proto.package == "shoal.v1"
    (service,) = proto.service
    methods = {m.name: (m.input_type, m.output_type, m.server_streaming) for m in service.method}
    assert methods["Generate"] == (".shoal.v1.GenerateRequest", ".shoal.v1.GenerateChunk", True)
    assert set(methods) == {"Submit", "Stream", "Generate", "Cancel", "GetStats", "GetModelInfo"}
    assert "GenerateRequest" in {m.name for m in proto.message_type}

    own = describe(itself)  # reflection describes itself, under its own package
    assert own.package == f"grpc.reflection.{version}"
    assert [m.name for m in own.service[0].method] == ["ServerReflectionInfo"]
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_v1_descriptor_is_v1alpha_renamed() -> None:
    """Same messages, fields, numbers and types: the wire forms are identical."""
    v1 = descriptor_pb2.FileDescriptorProto()
    v1_file().CopyToProto(v1)
    alpha = descriptor_pb2.FileDescriptorProto()
    v1alpha.DESCRIPTOR.CopyToProto(alpha)
    assert (v1.name, v1.package) == (V1_FILE, "grpc.reflection.v1")
    assert not v1.options.deprecated and alpha.options.deprecated
    for a, b in zip(v1.message_type, alpha.message_type, strict=True):
        assert a.name == b.name
        fields = [(f.name, f.number, f.type, f.label, f.oneof_index) for f in a.field]
        assert fields == [(f.name, f.number, f.type, f.label, f.oneof_index) for f in b.field]
        types = [f.type_name.replace(".v1.", ".v1alpha.") for f in a.field]
        assert types == [f.type_name for f in b.field]
    assert v1_file().name == V1_FILE  # added once, found in the pool after that
