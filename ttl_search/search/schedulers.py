"""Ray Tune trial schedulers a study can use (``scheduler.type``), built lazily so that naming
and validating them needs no Ray."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class SchedulerKind:
    """A Ray Tune trial scheduler."""

    name: str
    """Key in study files (``scheduler.type``)."""
    description: str
    """One line for help texts."""
    build: Callable[[Any, int], Any]
    """(the study's ``scheduler`` settings, the trials' max epochs) -> a Ray Tune scheduler."""


def _fifo(settings: Any, max_epochs: int) -> Any:
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


def _asha(settings: Any, max_epochs: int) -> Any:
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", max_t=max_epochs, grace_period=settings.grace_period,
                         reduction_factor=settings.reduction_factor)


SCHEDULERS: dict[str, SchedulerKind] = {k.name: k for k in (
    SchedulerKind("fifo", "every trial runs to the end", _fifo),
    SchedulerKind("asha", "stop weak trials early (stored as PRUNED with their epochs)", _asha),
)}
