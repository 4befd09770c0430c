"""The worker channel: the only code the front and the workers both import.

`ring` is the transport (shared-memory rings and doorbells); `messages` the
fixed binary messages that travel on it. Standard library only.
"""
