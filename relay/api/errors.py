"""SES error codes per protocol (pure).

relay/sets.py raises `SesError` with SES v1's codes (ConfigurationSetDoesNotExist, ...). The v1 wire code is
that code, except the two the model spells with an `Exception` suffix; v2 has a handful of generic shapes
(NotFoundException, ...) each with its own HTTP status. botocore picks the modelled exception class by these
exact strings, so they are one table here.
"""

from __future__ import annotations

from dataclasses import dataclass

# relay/sets.py code -> v1 wire code (botocore-modelled), where they differ.
V1_CODES = {
    "TrackingOptionsAlreadyExists": "TrackingOptionsAlreadyExistsException",
    "TrackingOptionsDoesNotExist": "TrackingOptionsDoesNotExistException",
}
# relay/sets.py (v1) code -> v2 error shape.
V2_SHAPES = {
    "ConfigurationSetDoesNotExist": "NotFoundException",
    "EventDestinationDoesNotExist": "NotFoundException",
    "TrackingOptionsDoesNotExist": "NotFoundException",
    "ConfigurationSetAlreadyExists": "AlreadyExistsException",
    "EventDestinationAlreadyExists": "AlreadyExistsException",
    "TrackingOptionsAlreadyExists": "AlreadyExistsException",
    "LimitExceeded": "LimitExceededException",
    "TooManyRequests": "TooManyRequestsException",
    "TemplateDoesNotExist": "NotFoundException",
    "AlreadyExists": "AlreadyExistsException",
}
V2_STATUS = {"NotFoundException": 404, "AlreadyExistsException": 400, "LimitExceededException": 400,
             "BadRequestException": 400, "TooManyRequestsException": 429, "ConcurrentModificationException": 500,
             "UnknownOperationException": 404, "InternalFailure": 500, "InvalidNextTokenException": 400,
             "MessageRejected": 400, "ServiceUnavailable": 503}
# v1 codes that are not the client's fault (all others are 400 Sender)
V1_STATUS = {"ServiceUnavailable": 503}


@dataclass(frozen=True)
class WireError:
    status: int
    code: str
    message: str
    sender: bool = True  # v1 <Type>: Sender (the client's fault) or Receiver


def v1_error(code: str, message: str, status: int | None = None) -> WireError:
    """A relay/sets.py or auth code as SES v1 sends it (all modelled errors are 400 Sender)."""
    status = status or V1_STATUS.get(code, 400)
    return WireError(status, V1_CODES.get(code, code), message, status < 500)


def v2_error(code: str, message: str, status: int | None = None) -> WireError:
    """A relay/sets.py code as an SES v2 shape (anything invalid is BadRequestException); auth codes pass
    through with the status given."""
    if status is not None:
        return WireError(status, code, message, status < 500)
    shape = V2_SHAPES.get(code, code if code in V2_STATUS else "BadRequestException")
    return WireError(V2_STATUS[shape], shape, message, V2_STATUS[shape] < 500)


def validation_message(value: object, where: str, constraint: str) -> str:
    """AWS's wording for a value the model refuses."""
    return f"1 validation error detected: Value '{value}' at '{where}' failed to satisfy constraint: {constraint}"


def enum_constraint(values: tuple[str, ...] | list[str]) -> str:
    return f"Member must satisfy enum value set: [{', '.join(values)}]"


# Sending control's codes (relay/core/control.py, relay/api/account.py, relay/api/identities.py): SES v1 names
# each pause, v2 has one SendingPausedException; throttling is v1's unmodelled `Throttling`, v2's 429.
V1_CODES.update({"AccountSendingPaused": "AccountSendingPausedException",
                 "ConfigurationSetSendingPaused": "ConfigurationSetSendingPausedException"})
V2_SHAPES.update({"AccountSendingPaused": "SendingPausedException",
                  "ConfigurationSetSendingPaused": "SendingPausedException",
                  "Throttling": "TooManyRequestsException", "MessageRejected": "MessageRejected"})
V2_STATUS.update({"SendingPausedException": 400, "MessageRejected": 400})
