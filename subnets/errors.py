"""User-facing errors: each names the problem and the fix, and maps to exit status 2."""

from __future__ import annotations


class EdgenasError(Exception):
    """A problem the user can fix. The CLI prints it without a traceback and exits 2."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix

    def __str__(self) -> str:
        return self.problem if not self.fix else f"{self.problem}\n  fix: {self.fix}"


class ConfigError(EdgenasError):
    """A sub-network config that does not fit its base model or search space."""


class ModelLoadError(EdgenasError):
    """A base model that cannot be found or is not a supported Llama-family decoder."""


class InputFileError(EdgenasError):
    """A user-supplied file that is missing, unreadable or malformed."""


class ExportError(EdgenasError):
    """An ONNX export that cannot be made with the requested options."""
