"""Generated protobuf code for fairedge's wire formats (sources in `proto/`).

Import the modules directly, e.g. `from fairedge.common.wire import adapter_update_pb2`.
Regenerate after editing a `.proto` file with `python -m fairedge.common.wire.generate`;
`tests/test_wire.py` fails when the committed code drifts from `proto/`.
"""
