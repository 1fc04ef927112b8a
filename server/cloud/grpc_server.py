"""Start a gRPC server for the cloud service: explicit message limits, per-device credentials, optional TLS."""

from __future__ import annotations

from concurrent import futures

import grpc

from fairedge.common.wire import edge_service_pb2_grpc as pb_grpc
from fairedge.server.cloud.credentials import CredentialStore
from fairedge.server.cloud.servicer import DeviceService, EdgeAdaptationServicer

GrpcServer = grpc.Server


def start_grpc_server(
    service: DeviceService,
    *,
    host: str,
    port: int,
    credentials: CredentialStore,
    max_message_mb: int,
    max_workers: int,
    tls: tuple[bytes, bytes] | None = None,
) -> tuple[grpc.Server, int]:
    """A started server for `service` and the port it listens on (`port=0` picks a free one).

    `tls` is `(certificate chain PEM, private key PEM)`; without it the port is plaintext
    (fine on loopback, not across a network: credentials travel in the clear).
    """
    limit = max_message_mb * 1024 * 1024
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="cloud-rpc"),
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),  # a second service on the same port must fail, not share it
        ],
    )
    pb_grpc.add_EdgeAdaptationServicer_to_server(EdgeAdaptationServicer(service, credentials), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if tls is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, grpc.ssl_server_credentials([(tls[1], tls[0])]))
    except RuntimeError as err:
        raise OSError(f"cannot listen on {address}: {err}") from None
    if bound == 0:
        raise OSError(f"cannot listen on {address} (in use or not a local address)")
    server.start()
    return server, bound
