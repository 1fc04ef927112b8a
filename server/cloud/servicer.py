"""The gRPC face of the cloud service: protobuf in, protobuf out, a `CloudError` -> its status code.

No logic of its own beyond that translation, so the in-process API and gRPC behave alike.
`STATUS` is the one table of which refusal is which gRPC status.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NoReturn, Protocol

import grpc
import numpy as np

from fairedge.common.config import CloudConfig
from fairedge.common.tensor_proto import to_proto
from fairedge.common.wire import edge_service_pb2 as pb
from fairedge.common.wire import edge_service_pb2_grpc as pb_grpc
from fairedge.server.cloud.device import Device
from fairedge.server.cloud.errors import (
    BatchTooLarge,
    CloudError,
    InvalidRequest,
    Overloaded,
    ShuttingDown,
    UnknownDevice,
    WrongModel,
)

STATUS: dict[type[CloudError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    BatchTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UnknownDevice: grpc.StatusCode.NOT_FOUND,
    WrongModel: grpc.StatusCode.FAILED_PRECONDITION,
    # UNAVAILABLE, not RESOURCE_EXHAUSTED: the request is fine, the device backs off and sends it again
    Overloaded: grpc.StatusCode.UNAVAILABLE,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
}
"""The gRPC status of each refusal; an unlisted CloudError takes its nearest listed base class's, else INTERNAL."""


def status_of(err: CloudError) -> grpc.StatusCode:
    """The gRPC status code a refusal is sent as (see `STATUS`)."""
    return next((STATUS[cls] for cls in type(err).__mro__ if cls in STATUS), grpc.StatusCode.INTERNAL)


class DeviceService(Protocol):
    """What the servicer needs of the cloud service (`fairedge.server.cloud.CloudService`)."""

    cfg: CloudConfig
    norm_names: list[str]

    def register(self, device_id: str, model_id: str, model_version: str) -> Device: ...

    def device(self, device_id: str) -> Device: ...

    def upload_batch(self, batch: pb.SampleBatch) -> tuple[int, dict[str, Any]]: ...

    def norm_params(self, device_id: str) -> tuple[int, dict[str, np.ndarray]]: ...

    def watch(
        self, device_id: str, known_version: int, is_active: Callable[[], bool] = ..., poll_s: float = ...
    ) -> Iterator[tuple[int, dict[str, np.ndarray]]]: ...


def norm_params_message(version: int, arrays: dict) -> pb.NormParams:
    """A NormParams message: the version and every norm param as a float32 Tensor."""
    return pb.NormParams(version=version, params=[to_proto(name, a) for name, a in arrays.items()])


def _abort(context: grpc.ServicerContext, err: CloudError, note: str = "") -> NoReturn:
    context.abort(status_of(err), str(err) + note)
    raise AssertionError("grpc's abort raises")  # for type checkers: abort never returns


class EdgeAdaptationServicer(pb_grpc.EdgeAdaptationServicer):
    """Implements `fairedge.v1.EdgeAdaptation` on top of a `DeviceService`."""

    def __init__(self, service: DeviceService) -> None:
        self.service = service

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.RegisterReply:
        try:
            device = self.service.register(request.device_id, request.model_id, request.model_version)
        except CloudError as err:
            _abort(context, err)
        return pb.RegisterReply(
            params_version=device.published[0],
            norm_param_names=self.service.norm_names,
            max_batch_samples=self.service.cfg.max_batch_samples,
        )

    def Upload(self, request_iterator: Iterator[pb.SampleBatch], context: grpc.ServicerContext) -> pb.UploadReply:
        device_id, accepted, stored, meta = None, 0, 0, None
        for batch in request_iterator:
            try:
                if device_id is not None and batch.device_id != device_id:
                    raise InvalidRequest(
                        f"device_id = {batch.device_id!r} in batch_id {batch.batch_id}, but this "
                        f"Upload stream is for {device_id!r}: one device per stream"
                    )
                n, meta = self.service.upload_batch(batch)
            except CloudError as err:
                note = (
                    (f" ({stored} earlier batches of this stream were stored; last_batch_id = {meta['last_batch_id']})")
                    if stored and meta is not None
                    else ""
                )
                _abort(context, err, note)
            device_id = batch.device_id
            accepted += n
            stored += 1  # noqa: SIM113  (counts only batches that were stored)
        if device_id is None or meta is None:  # an empty stream: nothing to say about any device
            return pb.UploadReply()
        return pb.UploadReply(
            accepted=accepted,
            total_accepted=meta["total_accepted"],
            last_batch_id=meta["last_batch_id"] or 0,
            params_version=self.service.device(device_id).published[0],
        )

    def GetNormParams(self, request: pb.NormParamsRequest, context: grpc.ServicerContext) -> pb.NormParams:
        try:
            version, arrays = self.service.norm_params(request.device_id)
        except CloudError as err:
            _abort(context, err)
        return norm_params_message(version, arrays)

    def WatchNormParams(self, request: pb.NormParamsRequest, context: grpc.ServicerContext) -> Iterator[pb.NormParams]:
        try:
            for version, arrays in self.service.watch(request.device_id, request.known_version, context.is_active):
                yield norm_params_message(version, arrays)
        except CloudError as err:
            _abort(context, err)
