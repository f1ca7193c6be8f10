"""Errors of the predictor stage the user can act on."""

from __future__ import annotations

from subnets.errors import EdgenasError


class DataError(EdgenasError):
    """Training or evaluation data that cannot be used."""
