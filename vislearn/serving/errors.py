"""The one error type of the serving stack: a gRPC status code and a message.

The embedded server answers every failure with a `ServingError`; gRPC sends
its code as the call status and REST turns it into TF Serving's HTTP code and
`{"error": message}` body. Codes follow TF Serving (see `HTTP_STATUS`).
"""

import grpc

# TF Serving's mapping (model_servers/http_server.cc, ToHTTPStatusCode).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}

# tensorflow.error.Code numbers equal gRPC's; used for StatusProto.error_code.
CODE_NUMBER = {code: code.value[0] for code in grpc.StatusCode}
CODE_BY_NUMBER = {number: code for code, number in CODE_NUMBER.items()}


class ServingError(Exception):
    """A request failed with gRPC status `code` and a one-line `message`."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = str(message)

    @property
    def http_status(self):
        return HTTP_STATUS.get(self.code, 500)

    def __repr__(self):
        return f"ServingError({self.code.name}, {self.message!r})"


def invalid(message):
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message):
    return ServingError(grpc.StatusCode.NOT_FOUND, message)


def from_tf_error(error):
    """A `tf.errors.OpError` keeps its code (TF and gRPC share the numbering)."""
    code = CODE_BY_NUMBER.get(getattr(error, "error_code", 2), grpc.StatusCode.UNKNOWN)
    message = (getattr(error, "message", None) or str(error)).strip().splitlines()
    return ServingError(code, message[0] if message else type(error).__name__)
