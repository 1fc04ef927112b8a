"""A device credential as it travels: `<device_id>:<secret>`, so the id it is bound to goes with it.

The cloud issues and checks credentials (`fairedge.server.cloud.credentials`) and keeps only a salted
hash of each; a device only needs to read which id its credential is for, to refuse a mismatched
`--device-id` before it calls the cloud. Device ids never contain `:`, secrets are URL-safe base64.
"""

from __future__ import annotations

SEPARATOR = ":"


def split_token(token: str) -> tuple[str, str]:
    """`(device_id, secret)` of a credential; ValueError naming the problem if it is not `<device_id>:<secret>`."""
    device_id, sep, secret = token.strip().partition(SEPARATOR)
    if not sep or not device_id or not secret:
        raise ValueError(  # never echo a credential, even a malformed one
            f"the credential ({len(token)} characters) is not '<device_id>:<secret>'; "
            "issue one with `fairedge-server credentials issue`"
        )
    return device_id, secret


def join_token(device_id: str, secret: str) -> str:
    """The credential string a device sends for `device_id`."""
    return f"{device_id}{SEPARATOR}{secret}"
