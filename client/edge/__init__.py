"""The edge runtime: an exported ONNX model adapted online with CEMA through a cloud service.

`EdgeRuntime` (runtime.py) ties together the session with swappable norm params (session.py),
sample selection (selection.py), the disk upload queue (upload_queue.py), the gRPC link
(cloud_link.py) and the threads that sync with the cloud (cloud_sync.py); inputs.py reads streams.
"""

from fairedge.client.edge.cloud_link import CloudEndpoint, CloudLink
from fairedge.client.edge.inputs import StreamBatch, batched, open_stream
from fairedge.client.edge.runtime import BatchRecord, EdgeRuntime
from fairedge.client.edge.selection import CemaSelector, FixedSelector, make_selector, softmax_entropy
from fairedge.client.edge.session import EdgeSession, NormParamSet
from fairedge.client.edge.upload_queue import UploadQueue

__all__ = [
    "BatchRecord",
    "CemaSelector",
    "CloudEndpoint",
    "CloudLink",
    "EdgeRuntime",
    "EdgeSession",
    "FixedSelector",
    "NormParamSet",
    "StreamBatch",
    "UploadQueue",
    "batched",
    "make_selector",
    "open_stream",
    "softmax_entropy",
]
