"""Bearer-token authentication for the cloud service, as a gRPC server interceptor.

Every call must carry `authorization: Bearer <token>` metadata with one of the accepted
tokens; anything else is refused with UNAUTHENTICATED before a handler runs. Tokens come
from a file (one per line, `#` comments) and/or an environment variable (comma-separated).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import grpc

TOKENS_ENV = "FAIREDGE_CLOUD_TOKENS"


def load_tokens(path: str | Path | None = None, env: str = TOKENS_ENV) -> list[str]:
    """The accepted tokens from `path` and the environment variable `env`; at least one is required."""
    tokens: list[str] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"tokens file {str(path)!r} does not exist")
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                tokens.append(line)
    tokens += [t.strip() for t in os.environ.get(env, "").split(",") if t.strip()]
    return check_tokens(tokens, source=f"{str(path)!r} or ${env}" if path else f"${env}")


def check_tokens(tokens: Iterable[str], source: str = "tokens") -> list[str]:
    """The tokens, if there is at least one and none has whitespace or is shorter than 8 characters."""
    tokens = list(dict.fromkeys(tokens))
    if not tokens:
        raise ValueError(f"no access tokens in {source}: the cloud service refuses to run without authentication")
    for t in tokens:
        if len(t) < 8 or any(c.isspace() for c in t):
            raise ValueError(f"access token {t[:3]}... is unusable: tokens need >= 8 characters and no whitespace")
    return tokens


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata a client sends: `(("authorization", "Bearer <token>"),)`."""
    return (("authorization", f"Bearer {token}"),)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Lets a call through only with a valid bearer token; otherwise aborts it with UNAUTHENTICATED."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._tokens = [t.encode() for t in check_tokens(tokens)]

    def _problem(self, metadata: Iterable[tuple[str, Any]]) -> str | None:
        values = [v for k, v in metadata if k == "authorization"]
        if not values:
            return "missing 'authorization' metadata; send 'authorization: Bearer <token>'"
        value = values[0] if isinstance(values[0], str) else values[0].decode(errors="replace")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "'authorization' metadata must be 'Bearer <token>'"
        given = token.strip().encode()
        # compare against every token, in constant time per token, so timing says nothing
        if not any([hmac.compare_digest(given, t) for t in self._tokens]):
            return "invalid access token"
        return None

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        problem = self._problem(handler_call_details.invocation_metadata or ())
        if problem is None or handler is None:
            return handler

        def deny(_request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

        # the refusing handler must have the same streaming shape as the method it replaces
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)
