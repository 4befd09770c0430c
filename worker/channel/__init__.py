"""The worker channel: the only code the front and the workers both import.

`types` holds the plain values both sides use (priority, finish reason,
sampling parameters, engine knobs); `messages` the messages and their binary
codec; `ring` the transport (shared-memory rings and doorbells); `client` the
engine-client interface that both transports implement. Standard library only.
"""
