"""The gRPC face of `CloudService`: protobuf in, protobuf out, `RequestError` -> status code.

No logic of its own beyond that translation, so the in-process API and gRPC behave alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc

from fairedge.common.tensor_proto import to_proto
from fairedge.common.wire import edge_service_pb2 as pb
from fairedge.common.wire import edge_service_pb2_grpc as pb_grpc
from fairedge.server.cloud.validation import RequestError

if TYPE_CHECKING:
    from fairedge.server.cloud.service import CloudService


def norm_params_message(version: int, arrays: dict) -> pb.NormParams:
    """A NormParams message: the version and every norm param as a float32 Tensor."""
    return pb.NormParams(version=version, params=[to_proto(name, a) for name, a in arrays.items()])


class EdgeAdaptationServicer(pb_grpc.EdgeAdaptationServicer):
    """Implements `fairedge.v1.EdgeAdaptation` on top of a `CloudService`."""

    def __init__(self, service: CloudService) -> None:
        self.service = service

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.RegisterReply:
        try:
            device = self.service.register(request.device_id, request.model_id, request.model_version)
        except RequestError as err:
            context.abort(err.code, err.message)
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
                    raise RequestError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"device_id = {batch.device_id!r} in batch_id {batch.batch_id}, but this "
                        f"Upload stream is for {device_id!r}: one device per stream",
                    )
                n, meta = self.service.upload_batch(batch)
            except RequestError as err:
                note = (
                    (f" ({stored} earlier batches of this stream were stored; last_batch_id = {meta['last_batch_id']})")
                    if stored
                    else ""
                )
                context.abort(err.code, err.message + note)
            device_id = batch.device_id
            accepted += n
            stored += 1  # noqa: SIM113  (counts only batches that were stored)
        if device_id is None:  # an empty stream: nothing to say about any device
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
        except RequestError as err:
            context.abort(err.code, err.message)
        return norm_params_message(version, arrays)

    def WatchNormParams(self, request: pb.NormParamsRequest, context: grpc.ServicerContext) -> Iterator[pb.NormParams]:
        try:
            for version, arrays in self.service.watch(request.device_id, request.known_version, context.is_active):
                yield norm_params_message(version, arrays)
        except RequestError as err:
            context.abort(err.code, err.message)
