"""Network transports: the ZMQ endpoint for remote environments and its client library.

`wire` is the frame format (documented in `runtime_image/docs/wire-format.md`),
`endpoint` serves it inside the runtime, `client` is what a remote simulator imports.
The NATS trajectory publisher (pipeline issue) implements `sinks.base.TrajectorySink`.
"""
