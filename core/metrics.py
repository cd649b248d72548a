"""CloudWatch metrics as EMF lines on stdout, through Powertools, from both processes.

In Lambda the handler's `log_metrics` decorator flushes once per invocation; the long-running
media service (and `parley serve webhook`) flush from a periodic task instead. One namespace for
both sides: `POWERTOOLS_METRICS_NAMESPACE`, default `Parley`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from aws_lambda_powertools import Metrics
from aws_lambda_powertools.metrics import MetricUnit

if TYPE_CHECKING:  # at run time the engine's units are read by value: core.events imports core.tools, which counts
    from core.events import Unit

metrics = Metrics(namespace=os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "Parley"))

# Every metric the code emits for a failure: each has a CloudWatch alarm in template.yaml, for each
# service that emits it (tests/infra/test_template.py reads the source and the template both ways).
FAILURES = frozenset(
    {
        "BookkeepingFailures",  # a call's books not written
        "LlmFailures",  # a reply the model did not give (after its retry)
        "LlmRefused",  # the model refused to answer (content_filter): the caller heard an apology
        "MalformedFrames",  # the media socket sent what Twilio does not
        "MalformedRequests",  # a webhook request without what Twilio always sends
        "ProviderFailures",  # a provider refused for good (key, plan, model)
        "SignatureRejected",  # a request or upgrade not signed with our token
        "StreamErrors",  # Twilio reported a stream error
        "StreamResumesExhausted",  # a lost stream could not be resumed again: the caller heard an apology
        "StreamsRefused",  # a stream without a valid token for its call
        "TaskProtectionFailures",  # the ECS agent refused scale-in protection: a deploy may cut calls
        "ToolFailures",  # a team's tool timed out, refused or answered garbage
        "TtsFailures",  # a line the voice did not say
        "UnknownCalls",  # Twilio asked what to do with a call we have no books for: it was hung up
    }
)


def count(name: str, value: float = 1) -> None:
    metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)


def milliseconds(name: str, value: float) -> None:
    metrics.add_metric(name=name, unit=MetricUnit.Milliseconds, value=value)


def flush() -> None:
    """Print what has accumulated as one EMF line (nothing when nothing was recorded)."""
    if metrics.metric_set:
        metrics.flush_metrics()


_UNITS = {"Milliseconds": MetricUnit.Milliseconds, "Count": MetricUnit.Count}  # Unit's values


def record(name: str, value: float, unit: Unit) -> None:
    """A metric the conversation engine asked for, in the unit it named."""
    metrics.add_metric(name=name, unit=_UNITS[unit.value], value=value)
