"""The one exception root of ttl-search and its subclasses.

Every error a user can cause (bad config, unknown backbone, missing data, ...) is a
:class:`TTLSearchError`; the CLI prints its message on one line and exits with status 2.
Messages name the problem and, where there is a closed set, the valid choices.
"""

from __future__ import annotations

from typing import Iterable


class TTLSearchError(Exception):
    """Root of every error ttl-search raises on purpose."""


class ConfigError(TTLSearchError):
    """A configuration key or value is invalid."""


class BackboneError(TTLSearchError):
    """Unknown backbone, or a registry misuse (for example a name registered twice)."""


class CutError(TTLSearchError):
    """A cut point that does not exist or is invalid at the configured input size."""


class WeightsError(TTLSearchError):
    """Pretrained weights that cannot be had or do not fit the backbone."""


class DataError(TTLSearchError):
    """Missing, corrupt or inconsistent data."""


class TrialError(TTLSearchError):
    """A trial that could not finish (diverged loss, ...). ``reason`` is a short tag."""

    def __init__(self, message: str, reason: str = "error") -> None:
        super().__init__(message)
        self.reason = reason


class StudyError(TTLSearchError):
    """A study that does not exist, has no completed trial, or cannot be resumed."""


def choices(values: Iterable[object]) -> str:
    """Format a closed set of valid values for an error message."""
    return ", ".join(str(v) for v in values)
