"""CloudWatch metrics as EMF lines on stdout, through Powertools, from both processes.

In Lambda the handler's `log_metrics` decorator flushes once per invocation; the long-running
media service (and `parley serve webhook`) flush from a periodic task instead. One namespace for
both sides: `POWERTOOLS_METRICS_NAMESPACE`, default `Parley`.
"""

from __future__ import annotations

import os

from aws_lambda_powertools import Metrics
from aws_lambda_powertools.metrics import MetricUnit

from core.events import Unit

metrics = Metrics(namespace=os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "Parley"))


def count(name: str, value: float = 1) -> None:
    metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)


def milliseconds(name: str, value: float) -> None:
    metrics.add_metric(name=name, unit=MetricUnit.Milliseconds, value=value)


def flush() -> None:
    """Print what has accumulated as one EMF line (nothing when nothing was recorded)."""
    if metrics.metric_set:
        metrics.flush_metrics()


_UNITS = {Unit.MILLISECONDS: MetricUnit.Milliseconds, Unit.COUNT: MetricUnit.Count}


def record(name: str, value: float, unit: Unit) -> None:
    """A metric the conversation engine asked for, in the unit it named."""
    metrics.add_metric(name=name, unit=_UNITS[unit], value=value)
