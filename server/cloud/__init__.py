"""The CEMA cloud service: devices upload selected samples, the cloud distils new norm params for them.

Entry points: `CloudService` (Python API and gRPC server), `load_served_model` (a run
folder -> what to serve), `fairedge-server cloud` (command line). Protocol: proto/edge_service.proto.
"""

from fairedge.server.cloud.auth import bearer_metadata, load_tokens
from fairedge.server.cloud.learner import CemaLearner, DeviceParams, StepStats
from fairedge.server.cloud.model import ServedModel, load_served_model
from fairedge.server.cloud.service import CloudService

__all__ = [
    "CemaLearner",
    "CloudService",
    "DeviceParams",
    "ServedModel",
    "StepStats",
    "bearer_metadata",
    "load_served_model",
    "load_tokens",
]
