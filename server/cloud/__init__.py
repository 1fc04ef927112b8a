"""The CEMA cloud service: devices upload selected samples, the cloud distils new norm params for them.

Entry points: `CloudService` (Python API and gRPC server), `load_served_model` (a run
folder -> what to serve), `CredentialStore` (per-device credentials), `fairedge-server cloud` and
`fairedge-server credentials` (command line); `fairedge-server cloud status` and `fleet_stats` (the
operator's view: per-device counters in `<state_dir>/status.json`, optionally Prometheus metrics). Protocol: proto/edge_service.proto.
Refusals are `errors.CloudError`s; `servicer.STATUS` says which gRPC status each one is.
"""

from fairedge.server.cloud.auth import bearer_metadata
from fairedge.server.cloud.credentials import CredentialStore
from fairedge.server.cloud.errors import (
    BatchTooLarge,
    CloudError,
    InvalidRequest,
    NotYourDevice,
    Overloaded,
    ShuttingDown,
    StaleEpoch,
    Unauthenticated,
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
    "CredentialStore",
    "DeviceParams",
    "InvalidRequest",
    "NotYourDevice",
    "Overloaded",
    "ServedModel",
    "ShuttingDown",
    "StaleEpoch",
    "StepStats",
    "Unauthenticated",
    "UnknownDevice",
    "WrongModel",
    "bearer_metadata",
    "load_served_model",
]
