"""Generated gRPC code of shoal's wire contract (protos/shoal/).

Only the package markers are committed: `shoal.v1.inference_pb2`, `inference_pb2_grpc` (and
their .pyi) are generated from protos/shoal/v1/inference.proto by the build (setup.py, on
`pip install .` / `pip install -e .`) and by `make protos`.
"""
