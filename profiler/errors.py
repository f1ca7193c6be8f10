"""Why a measurement failed, in the spirit of TVM's ``MeasureErrorNo``: every failed job
carries one of these classes, so a sweep's summary says what went wrong where."""

from __future__ import annotations

from enum import Enum

from subnets.errors import EdgenasError


class ErrorClass(str, Enum):
    COMPILE_ERROR = "compile_error"  # the runtime could not build a session / engine
    LOAD_ERROR = "load_error"  # the model is missing, corrupt or failed verification
    RUNTIME_ERROR = "runtime_error"  # the model failed while running, or the agent died
    TIMEOUT = "timeout"  # no answer within the configured time
    OUT_OF_MEMORY = "out_of_memory"
    WRONG_ANSWER = "wrong_answer"  # non-finite or wrongly shaped outputs
    CONNECTION_LOST = "connection_lost"
    PROTOCOL_ERROR = "protocol_error"
    DISK_FULL = "disk_full"  # the board's disk: the profiler evicts its other models and retries
    UNKNOWN = "unknown"

    @classmethod
    def parse(cls, value: str | None) -> ErrorClass:
        try:
            return cls(value or "unknown")
        except ValueError:
            return cls.UNKNOWN

    @property
    def retryable(self) -> bool:
        """Worth another attempt: transient faults, not deterministic failures."""
        return self in (ErrorClass.TIMEOUT, ErrorClass.CONNECTION_LOST, ErrorClass.RUNTIME_ERROR,
                        ErrorClass.LOAD_ERROR, ErrorClass.UNKNOWN, ErrorClass.PROTOCOL_ERROR, ErrorClass.DISK_FULL)


class MeasureError(Exception):
    """A failed measurement (a job-level fault, not a user error)."""

    def __init__(self, error_class: ErrorClass, message: str) -> None:
        super().__init__(f"{error_class.value}: {message}")
        self.error_class = error_class
        self.message = message


class HostError(EdgenasError):
    """A host that cannot be resolved, reached, trusted or used."""


class StoreError(EdgenasError):
    """A measurement store that cannot be used."""
