"""The device's gRPC connection to the CEMA cloud service (proto/edge_service.proto).

One channel, reused: every call carries the device's credential (`authorization: Bearer <device_id>:<secret>`,
bound to that device id by the cloud), has a deadline, and the
channel's message-size limits are set explicitly (gRPC's default receive limit is 4 MiB). The
channel's own reconnect backoff is capped at ours, or after an outage gRPC itself could wait up to
two minutes before trying the cloud again. The unary calls (Register, GetNormParams) carry gRPC's
own retry policy (service config `retryPolicy`: jittered exponential backoff, UNAVAILABLE only, within
the call's deadline), so a brief outage costs no failed call; the streams are retried by `CloudSync`.
Bytes up and down are the serialized message sizes.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from fairedge.common.device_token import split_token
from fairedge.common.wire import edge_service_pb2 as pb
from fairedge.common.wire import edge_service_pb2_grpc as pb_grpc

SERVICE = "fairedge.v1.EdgeAdaptation"
RETRIED_METHODS = ("Register", "GetNormParams")
RETRY_ATTEMPTS = 3
"""Tries per unary call (the first one included) while the cloud answers UNAVAILABLE."""


def retry_service_config(initial_backoff_s: float, max_backoff_s: float) -> str:
    """The channel's service config: gRPC's per-call retry policy for the unary, idempotent methods."""
    policy = {
        "maxAttempts": RETRY_ATTEMPTS,
        "initialBackoff": f"{initial_backoff_s:.3f}s",
        "maxBackoff": f"{max(initial_backoff_s, max_backoff_s):.3f}s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    names = [{"service": SERVICE, "method": m} for m in RETRIED_METHODS]
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}]})


@dataclass(frozen=True)
class CloudEndpoint:
    """Where and how to reach the cloud."""

    address: str  # host:port
    token: str  # the device's credential, `<device_id>:<secret>` (fairedge-server credentials issue)
    tls_ca: bytes | None = None  # PEM root certificate(s); None = plaintext (loopback, tests)
    server_name: str | None = None  # TLS name to verify when it differs from the address' host

    def __post_init__(self) -> None:
        split_token(self.token)  # a malformed credential fails here, not at the first call

    @property
    def device_id(self) -> str:
        """The device the credential is bound to."""
        return split_token(self.token)[0]

    @classmethod
    def from_files(cls, address: str, token_file: str | Path, tls_ca: str | Path | None = None) -> CloudEndpoint:
        """Read the credential (whitespace stripped) and the optional CA certificate from files."""
        token_path = Path(token_file)
        if not token_path.is_file():
            raise ValueError(f"--token-file {str(token_path)!r} does not exist")
        token = token_path.read_text().strip()
        if not token:
            raise ValueError(f"--token-file {str(token_path)!r} is empty")
        try:
            split_token(token)
        except ValueError as err:
            raise ValueError(f"--token-file {str(token_path)!r}: {err}") from None
        ca = None
        if tls_ca is not None:
            ca_path = Path(tls_ca)
            if not ca_path.is_file():
                raise ValueError(f"--tls-ca {str(ca_path)!r} does not exist")
            ca = ca_path.read_bytes()
        return cls(address=address, token=token, tls_ca=ca)


class CloudLink:
    """Typed calls to the cloud; raises `grpc.RpcError` (with `.code()`) on failure."""

    def __init__(
        self,
        endpoint: CloudEndpoint,
        *,
        max_message_bytes: int = 64 << 20,
        rpc_timeout_s: float = 10.0,
        reconnect_backoff_max_s: float = 30.0,
        retry_backoff_s: float = 0.5,
    ) -> None:
        if ":" not in endpoint.address:
            raise ValueError(f"cloud address {endpoint.address!r} must look like host:port")
        self.endpoint = endpoint
        self.rpc_timeout_s = rpc_timeout_s
        backoff_ms = max(100, int(reconnect_backoff_max_s * 1000))
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", min(500, backoff_ms)),
            ("grpc.min_reconnect_backoff_ms", min(500, backoff_ms)),
            ("grpc.max_reconnect_backoff_ms", backoff_ms),
            ("grpc.enable_retries", 1),
            ("grpc.service_config", retry_service_config(max(0.001, retry_backoff_s), reconnect_backoff_max_s)),
        ]
        if endpoint.tls_ca is not None:
            if endpoint.server_name:
                options.append(("grpc.ssl_target_name_override", endpoint.server_name))
            creds = grpc.ssl_channel_credentials(root_certificates=endpoint.tls_ca)
            self.channel = grpc.secure_channel(endpoint.address, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(endpoint.address, options=options)
        self.stub = pb_grpc.EdgeAdaptationStub(self.channel)
        self._metadata = (("authorization", f"Bearer {endpoint.token}"),)
        self._lock = threading.Lock()
        self.bytes_up = 0
        self.bytes_down = 0

    def _count(self, up: int = 0, down: int = 0) -> None:
        with self._lock:
            self.bytes_up += up
            self.bytes_down += down

    def register(self, device_id: str, model_id: str, model_version: str, epoch: str = "") -> pb.RegisterReply:
        request = pb.RegisterRequest(device_id=device_id, model_id=model_id, model_version=model_version, epoch=epoch)
        reply = self.stub.Register(request, timeout=self.rpc_timeout_s, metadata=self._metadata)
        self._count(request.ByteSize(), reply.ByteSize())
        return reply

    def upload(self, batches: list[pb.SampleBatch]) -> pb.UploadReply:
        """Stream `batches` in one Upload call; the cloud acknowledges them all with one reply."""
        reply = self.stub.Upload(iter(batches), timeout=self.rpc_timeout_s, metadata=self._metadata)
        self._count(sum(b.ByteSize() for b in batches), reply.ByteSize())
        return reply

    def get_norm_params(self, device_id: str, known_version: int) -> pb.NormParams:
        request = pb.NormParamsRequest(device_id=device_id, known_version=known_version)
        reply = self.stub.GetNormParams(request, timeout=self.rpc_timeout_s, metadata=self._metadata)
        self._count(request.ByteSize(), reply.ByteSize())
        return reply

    def watch_norm_params(self, device_id: str, known_version: int) -> WatchCall:
        """A stream of newer versions, open until cancelled (`WatchCall.cancel`) or the cloud goes away."""
        request = pb.NormParamsRequest(device_id=device_id, known_version=known_version)
        call = self.stub.WatchNormParams(request, metadata=self._metadata)  # no deadline: long-lived
        self._count(up=request.ByteSize())
        return WatchCall(call, self)

    def close(self) -> None:
        self.channel.close()


class WatchCall:
    """Iterates the NormParams of a WatchNormParams call, counting their bytes."""

    def __init__(self, call, link: CloudLink) -> None:
        self._call = call
        self._link = link

    def __iter__(self) -> Iterator[pb.NormParams]:
        for message in self._call:
            self._link._count(down=message.ByteSize())
            yield message

    def cancel(self) -> None:
        self._call.cancel()
