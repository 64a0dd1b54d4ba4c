"""The project's error tree and the one table that maps it to HTTP status and gRPC codes.

Every error a client can see is an ``MpsServeError``. Foreign errors (TensorFlow, torch,
fsspec, pydantic) are translated where they enter with ``raise XError(...) from exc``.
Anything else that escapes becomes a generic 500/INTERNAL at the transport edge, logged with
its traceback and never shown to the client. All classes pickle (they cross Ray actors): each
keeps its message in ``args`` and takes no other constructor arguments.
"""

from __future__ import annotations

import enum
import logging

from mpsserve.text import bound_message

logger = logging.getLogger(__name__)


class GrpcCode(enum.IntEnum):
    """The gRPC status codes we use (values from grpc's ``StatusCode``; no grpc import here)."""

    OK = 0
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


class MpsServeError(Exception):
    """Base of every error the service reports on purpose; its message is safe to show."""

    http_status = 500
    grpc_code = GrpcCode.INTERNAL
    #: The replica, not the request, is at fault: the ingress sends it to another replica.
    retry_elsewhere = False
    #: A transient refusal: HTTP answers carry a Retry-After header.
    retry_after = False

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class InvalidInput(MpsServeError):
    """The request is malformed or does not fit the model's signature (names the tensor)."""

    http_status = 400
    grpc_code = GrpcCode.INVALID_ARGUMENT


class PayloadTooLarge(InvalidInput):
    """The request body or row count is over a configured limit."""

    http_status = 413
    grpc_code = GrpcCode.RESOURCE_EXHAUSTED


class HeadersTooLarge(InvalidInput):
    """The request's line and headers (or their count) are over the ingress's limit."""

    http_status = 431
    grpc_code = GrpcCode.RESOURCE_EXHAUSTED


class RequestTimeout(InvalidInput):
    """The client stopped sending a request's headers or body before it was complete."""

    http_status = 408
    grpc_code = GrpcCode.DEADLINE_EXCEEDED


class Overloaded(MpsServeError):
    """The ingress holds as many requests or connections as it is configured to; the
    client should retry soon, here or elsewhere (HTTP adds a Retry-After)."""

    http_status = 503
    grpc_code = GrpcCode.UNAVAILABLE
    retry_after = True


class Unauthenticated(MpsServeError):
    """The request carries no bearer token, or one the ingress does not accept (unknown,
    revoked or past its ``not_after``). HTTP answers carry ``WWW-Authenticate: Bearer``."""

    http_status = 401
    grpc_code = GrpcCode.UNAUTHENTICATED


class Forbidden(MpsServeError):
    """The request is well formed and authenticated, but what it asks for is turned off by
    the configuration (the repository API's load and unload: ``ingress.repository_api``)."""

    http_status = 403
    grpc_code = GrpcCode.PERMISSION_DENIED


class ModelNotFound(MpsServeError):
    """No model (or model version) of that name is configured."""

    http_status = 404
    grpc_code = GrpcCode.NOT_FOUND


class ModelNotReady(MpsServeError):
    """The model exists but cannot serve now (loading, no version, replica unhealthy)."""

    http_status = 503
    grpc_code = GrpcCode.UNAVAILABLE


class ReplicaUnavailable(ModelNotReady):
    """This replica cannot serve any more (a sticky CUDA error, its MPS server gone) and is
    being replaced; the request itself is fine, so the ingress tries another replica."""

    retry_elsewhere = True


class DeadlineExceeded(MpsServeError):
    """The request did not finish within the configured deadline."""

    http_status = 504
    grpc_code = GrpcCode.DEADLINE_EXCEEDED


class ModelLoadError(MpsServeError):
    """A model version could not be loaded or warmed up; the previous one keeps serving."""

    http_status = 503
    grpc_code = GrpcCode.UNAVAILABLE


class MpsError(MpsServeError):
    """The MPS control daemon is missing, unreachable or refused a command."""

    http_status = 503
    grpc_code = GrpcCode.UNAVAILABLE


class ConfigError(MpsServeError):
    """The service configuration is invalid; the message names the bad field."""

    http_status = 500
    grpc_code = GrpcCode.FAILED_PRECONDITION


class ClusterError(MpsServeError):
    """An ops command has no Ray cluster to talk to, or the one it was given does not answer;
    the message says what to pass instead."""

    grpc_code = GrpcCode.UNAVAILABLE


class EmbeddingStoreError(MpsServeError):
    """The embedding store (a Redis Cluster) cannot answer: unreachable, a shard down, the
    credentials refused, or a command failed; the message names the store, never a secret."""

    http_status = 503
    grpc_code = GrpcCode.UNAVAILABLE


class EmbeddingVersionMissing(EmbeddingStoreError):
    """An embedding version or table is not in the store, or not completely published."""


class EmbeddingDataError(EmbeddingStoreError):
    """Rows in the store do not fit what was asked: a wrong dimension, missing ids."""


class EmbeddingCacheError(MpsServeError):
    """The node's shared embedding cache (files in /dev/shm) cannot be opened or used: no
    space, no permission, a file of another layout; callers serve without it. The message
    names the file, the bytes it needs and why."""

    http_status = 503
    grpc_code = GrpcCode.UNAVAILABLE


class MetricsUnavailable(MpsServeError):
    """The metrics port cannot read the node's Ray metrics agent now (the message says why)."""

    http_status = 503
    grpc_code = GrpcCode.UNAVAILABLE
    retry_after = True


class InferenceError(MpsServeError):
    """The runtime failed on a request that passed validation."""

    http_status = 500
    grpc_code = GrpcCode.INTERNAL


GENERIC_INTERNAL_MESSAGE = "internal error; see the server log"

#: An error that crossed a wire by its HTTP status (a replica's frame) becomes the most
#: general class of that status again; any other status is an InferenceError (500). Its
#: gRPC code then follows from the class, as ``to_status`` reads it.
BY_HTTP_STATUS: dict[int, type[MpsServeError]] = {
    cls.http_status: cls
    for cls in (
        InvalidInput,
        Unauthenticated,
        Forbidden,
        ModelNotFound,
        RequestTimeout,
        PayloadTooLarge,
        HeadersTooLarge,
        InferenceError,
        ModelNotReady,
        DeadlineExceeded,
    )
}


def from_status(status: int, message: str, retry_elsewhere: bool = False) -> MpsServeError:
    """The error ``to_status`` turned into ``status`` and ``message`` on the other side;
    ``retry_elsewhere``: the replica broke, not the request (ReplicaUnavailable)."""
    if retry_elsewhere:
        return ReplicaUnavailable(message)
    return BY_HTTP_STATUS.get(status, InferenceError)(message)


def to_status(exc: BaseException) -> tuple[int, GrpcCode, str]:
    """Map any exception to (HTTP status, gRPC code, client-safe message).

    The single place where errors meet transports. Unknown exceptions are logged with their
    traceback here and reported without internals. An error raised in a replica arrives
    wrapped by Ray (``RayTaskError``) with the original in ``cause``; that is what we map.
    """
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    if isinstance(exc, MpsServeError):
        return exc.http_status, exc.grpc_code, bound_message(exc.message)
    logger.error("unhandled error", exc_info=exc)
    return 500, GrpcCode.INTERNAL, GENERIC_INTERNAL_MESSAGE
