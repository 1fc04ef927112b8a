"""The CEMA cloud service: devices upload selected samples, the cloud distils new norm params for them.

Entry points: `CloudService` (Python API and gRPC server), `load_served_model` (a run
folder -> what to serve), `fairedge-server cloud` (command line). Protocol: proto/edge_service.proto.
Refusals are `errors.CloudError`s; `servicer.STATUS` says which gRPC status each one is.
"""

from fairedge.server.cloud.auth import bearer_metadata, load_tokens
from fairedge.server.cloud.errors import (
    BatchTooLarge,
    CloudError,
    InvalidRequest,
    Overloaded,
    ShuttingDown,
    UnknownDevice,
    WrongModel,
)
from fairedge.server.cloud.learner import CemaLearner, DeviceParams, StepStats
from fairedge.server.cloud.model import ServedModel, load_served_model
from fairedge.server.cloud.service import CloudService

__all__ = [
    "BatchTooLarge",
    "CemaLearner",
    "CloudError",
    "CloudService",
    "DeviceParams",
    "InvalidRequest",
    "Overloaded",
    "ServedModel",
    "ShuttingDown",
    "StepStats",
    "UnknownDevice",
    "WrongModel",
    "bearer_metadata",
    "load_served_model",
    "load_tokens",
]
