"""shoal's gRPC front process: validation, pending queue, dispatch to worker processes."""
