"""Who is calling: the device a call's bearer credential belongs to, and whether the call is about it.

Every call carries `authorization: Bearer <device_id>:<secret>`. The servicer asks `authenticate` for
the caller's device id before it reads a request (`Unauthenticated` for a missing, malformed, unknown
or revoked credential) and `authorize` for each device id a request names (`NotYourDevice` when a valid
credential is used for another device). Messages never echo a credential.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fairedge.server.cloud.credentials import CredentialStore
from fairedge.server.cloud.errors import NotYourDevice, Unauthenticated


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata a client sends: `(("authorization", "Bearer <token>"),)`."""
    return (("authorization", f"Bearer {token}"),)


def bearer_token(metadata: Iterable[tuple[str, Any]]) -> str:
    """The token of the call's `authorization: Bearer <token>` metadata; Unauthenticated without one."""
    values = [v for k, v in metadata if k == "authorization"]
    if not values:
        raise Unauthenticated("missing 'authorization' metadata; send 'authorization: Bearer <device_id>:<secret>'")
    value = values[0] if isinstance(values[0], str) else values[0].decode(errors="replace")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("'authorization' metadata must be 'Bearer <device_id>:<secret>'")
    return token.strip()


def authenticate(metadata: Iterable[tuple[str, Any]], credentials: CredentialStore) -> str:
    """The device id the call's credential is valid for; Unauthenticated otherwise."""
    device_id = credentials.verify(bearer_token(metadata))
    if device_id is None:
        raise Unauthenticated(
            "invalid access token: the credential is malformed, unknown, revoked or rotated; "
            "ask the operator for this device's credential (fairedge-server credentials issue)"
        )
    return device_id


def authorize(caller: str, device_id: str) -> None:
    """NotYourDevice unless the request's `device_id` is the caller's own."""
    if device_id != caller:
        raise NotYourDevice(
            f"device_id = {device_id!r}: this credential is for device {caller!r}; a device may only act for itself"
        )
