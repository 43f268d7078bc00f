"""The edgeos exception tree.

Every error edgeos raises on purpose derives from :class:`EdgeOSError`; third-party
exceptions are translated at the boundary with ``raise ... from exc``. The type carries
the decision a caller has to make (fix the input, look elsewhere, retry later)::

    EdgeOSError
    ├── ConfigError              a setting or configuration file is wrong
    ├── ManifestError            a YAML manifest is wrong (names file and field)
    ├── StateError               the node database cannot be used
    │   └── SchemaVersionError   written by a newer edgeos; refused, not opened
    ├── NotFoundError            a named thing does not exist
    │   └── ModelNotFoundError
    ├── ConflictError            the thing exists already / would be lost
    ├── InvalidModelError        a model file is corrupt, not ONNX, or fails the checker
    ├── InvalidRequestError      an inference request does not match the model
    ├── ModelRunError            ONNX Runtime failed on inputs that matched the model
    ├── ResourceError            a budget (memory, disk) does not allow the operation
    ├── QuantizationError        quantization could not produce a usable model
    ├── UnavailableError         temporarily unable; ``retryable`` is True
    ├── AuthenticationError      no, unknown, expired or revoked credentials
    ├── PermissionDeniedError    a known caller without the right (scope, device)
    └── VerificationError        a signature, certificate, pin or TUF check failed
"""

from __future__ import annotations

from typing import ClassVar


class EdgeOSError(Exception):
    """Root of every error edgeos raises on purpose.

    ``retryable`` tells a supervisor whether trying again later may succeed.
    """

    #: A class default; an instance may set its own when the decision depends on the case.
    retryable: bool = False
    #: The status an HTTP API answers with when this error ends a request.
    http_status: ClassVar[int] = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(EdgeOSError):
    """A setting, flag, environment variable or configuration file is invalid."""

    http_status: ClassVar[int] = 400


class ManifestError(EdgeOSError):
    """A manifest is invalid; the message names the file, the field and the reason."""

    http_status: ClassVar[int] = 400

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        detail = "; ".join(problems)
        super().__init__(f"{source}: {detail}")


class StateError(EdgeOSError):
    """The node database cannot be opened or used."""


class SchemaVersionError(StateError):
    """The database was written by a newer edgeos and is refused, not opened."""


class NotFoundError(EdgeOSError):
    """A named thing (model, version, agent, ...) does not exist."""

    http_status: ClassVar[int] = 404


class ModelNotFoundError(NotFoundError):
    """No model (or no such version of it) is registered."""


class ConflictError(EdgeOSError):
    """The operation would overwrite or lose something that exists."""

    http_status: ClassVar[int] = 409


class InvalidModelError(EdgeOSError):
    """A model file is corrupt, not ONNX, or does not pass the ONNX checker."""

    http_status: ClassVar[int] = 400


class InvalidRequestError(EdgeOSError):
    """An inference request does not match the model (name, shape, datatype, body)."""

    http_status: ClassVar[int] = 400


class ModelRunError(EdgeOSError):
    """ONNX Runtime failed while running a model on inputs that matched its manifest."""


class ResourceError(EdgeOSError):
    """A configured budget (memory, disk) does not allow the operation."""

    http_status: ClassVar[int] = 503


class QuantizationError(EdgeOSError):
    """Quantization could not produce a usable model."""

    http_status: ClassVar[int] = 422


class UnavailableError(EdgeOSError):
    """Temporarily unable to serve; trying again later may succeed."""

    retryable: bool = True
    http_status: ClassVar[int] = 503


class AuthenticationError(EdgeOSError):
    """No credentials, or credentials that are unknown, expired, revoked or forged."""

    http_status: ClassVar[int] = 401


class PermissionDeniedError(EdgeOSError):
    """The caller is known but may not do this (missing scope, another device's state)."""

    http_status: ClassVar[int] = 403


class VerificationError(EdgeOSError):
    """A signature, certificate, CA pin or TUF metadata check failed: the data is refused."""

    http_status: ClassVar[int] = 400
