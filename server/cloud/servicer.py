"""The gRPC face of the cloud service: who is calling, protobuf in, protobuf out, a `CloudError` -> its status.

Beyond that translation its only logic is the transport's own: each call's credential names the one
device it may act for (`auth`), checked before a request is read and again while a Watch stream
is open, so a revoked credential loses its stream too. The domain logic is the service's, so the
in-process API and gRPC behave alike. `STATUS` is the one table of which refusal is which gRPC status.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NoReturn, Protocol

import grpc
import numpy as np

from fairedge.common.config import CloudConfig
from fairedge.common.device_token import split_token
from fairedge.common.tensor_proto import to_proto
from fairedge.common.wire import edge_service_pb2 as pb
from fairedge.common.wire import edge_service_pb2_grpc as pb_grpc
from fairedge.server.cloud.auth import authenticate, authorize, bearer_token
from fairedge.server.cloud.credentials import CredentialStore
from fairedge.server.cloud.device import BatchAck, Device
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
from fairedge.server.cloud.fleet_stats import FleetStats

STATUS: dict[type[CloudError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    BatchTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UnknownDevice: grpc.StatusCode.NOT_FOUND,
    WrongModel: grpc.StatusCode.FAILED_PRECONDITION,
    # UNAVAILABLE, not RESOURCE_EXHAUSTED: the request is fine, the device backs off and sends it again
    Overloaded: grpc.StatusCode.UNAVAILABLE,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    NotYourDevice: grpc.StatusCode.PERMISSION_DENIED,
    # ABORTED: a conflict with another registration of the device; it registers again and carries on
    StaleEpoch: grpc.StatusCode.ABORTED,
}
"""The gRPC status of each refusal; an unlisted CloudError takes its nearest listed base class's, else INTERNAL."""


def status_of(err: CloudError) -> grpc.StatusCode:
    """The gRPC status code a refusal is sent as (see `STATUS`)."""
    return next((STATUS[cls] for cls in type(err).__mro__ if cls in STATUS), grpc.StatusCode.INTERNAL)


class DeviceService(Protocol):
    """What the servicer needs of the cloud service (`fairedge.server.cloud.CloudService`)."""

    cfg: CloudConfig
    norm_names: list[str]
    stats: FleetStats

    def is_known(self, device_id: str) -> bool: ...

    def register(self, device_id: str, model_id: str, model_version: str, epoch: str = ...) -> Device: ...

    def device(self, device_id: str) -> Device: ...

    def upload_batch(self, batch: pb.SampleBatch) -> BatchAck: ...

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
    """Implements `fairedge.v1.EdgeAdaptation` on top of a `DeviceService`, for the devices in `credentials`."""

    def __init__(self, service: DeviceService, credentials: CredentialStore) -> None:
        self.service = service
        self.credentials = credentials

    def _caller(self, context: grpc.ServicerContext, rpc: str, device_id: str | None = None) -> str:
        """The calling device's id (checked against the request's `device_id` when given); counts the call."""
        caller = authenticate(context.invocation_metadata() or (), self.credentials)
        self.service.stats.seen(caller, rpc)
        if device_id is not None:
            authorize(caller, device_id)
        return caller

    def _refuse(self, context: grpc.ServicerContext, err: CloudError, note: str = "") -> NoReturn:
        """Count the refusal against the device the call's credential names, then abort with its status.

        That is the caller for a valid credential; for a refused one (revoked, wrong secret), the id it
        claims if that id is known, else no device (so made-up ids cannot grow the counters).
        """
        try:
            claimed, _ = split_token(bearer_token(context.invocation_metadata() or ()))
        except (CloudError, ValueError):
            claimed = None
        self.service.stats.rejected(claimed if claimed and self.service.is_known(claimed) else None, err)
        _abort(context, err, note)

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.RegisterReply:
        try:
            self._caller(context, "Register", request.device_id)
            device = self.service.register(request.device_id, request.model_id, request.model_version, request.epoch)
        except CloudError as err:
            self._refuse(context, err)
        return pb.RegisterReply(
            params_version=device.published[0],
            norm_param_names=self.service.norm_names,
            max_batch_samples=self.service.cfg.max_batch_samples,
            last_batch_id=device.last_batch_id(),
        )

    def Upload(self, request_iterator: Iterator[pb.SampleBatch], context: grpc.ServicerContext) -> pb.UploadReply:
        try:
            caller = self._caller(context, "Upload")  # before a byte of the stream is read
        except CloudError as err:
            self._refuse(context, err)
        accepted, resent, stored, ack = 0, 0, 0, None
        for batch in request_iterator:
            try:
                authorize(caller, batch.device_id)
                ack = self.service.upload_batch(batch)
            except CloudError as err:
                note = (
                    f" ({stored} earlier batches of this stream were stored; last_batch_id = {ack.last_batch_id})"
                    if stored and ack is not None
                    else ""
                )
                self._refuse(context, err, note)
            accepted += ack.accepted
            resent += ack.resent
            stored += 1  # noqa: SIM113  (counts only batches that were stored)
        if ack is None:  # an empty stream: nothing to say about any device
            return pb.UploadReply()
        return pb.UploadReply(
            accepted=accepted,
            resent=resent,
            total_accepted=ack.total_accepted,
            last_batch_id=ack.last_batch_id,
            params_version=self.service.device(caller).published[0],
        )

    def GetNormParams(self, request: pb.NormParamsRequest, context: grpc.ServicerContext) -> pb.NormParams:
        try:
            self._caller(context, "GetNormParams", request.device_id)
            version, arrays = self.service.norm_params(request.device_id)
        except CloudError as err:
            self._refuse(context, err)
        return norm_params_message(version, arrays)

    def WatchNormParams(self, request: pb.NormParamsRequest, context: grpc.ServicerContext) -> Iterator[pb.NormParams]:
        def allowed() -> bool:  # the credential may be revoked while the stream is open (not a counted call)
            try:
                authorize(authenticate(context.invocation_metadata() or (), self.credentials), request.device_id)
            except CloudError:
                return False
            return True

        try:
            self._caller(context, "WatchNormParams", request.device_id)
            active = lambda: context.is_active() and allowed()  # noqa: E731
            for version, arrays in self.service.watch(request.device_id, request.known_version, active):
                yield norm_params_message(version, arrays)
            if not allowed():  # a revocation ended the stream: say so
                self._caller(context, "WatchNormParams", request.device_id)
        except CloudError as err:
            self._refuse(context, err)
