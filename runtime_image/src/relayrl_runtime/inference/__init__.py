"""Policy inference: model metadata, one backend module per format, and the policy head.

`model` reads `relayrl-model.json`; `onnx` and `torchscript` are the backends behind the
`backend.Backend` protocol; `policy` turns raw outputs into actions; `loader` ties them
together with load-time validation; `export` writes small test/demo models.
"""
