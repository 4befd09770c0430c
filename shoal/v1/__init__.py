"""shoal.v1: `inference_pb2` (messages) and `inference_pb2_grpc` (the Inference service stubs),
generated from protos/shoal/v1/inference.proto at build time (see shoal/__init__.py)."""
