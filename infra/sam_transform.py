"""The SAM transform of template.yaml, offline: no AWS credentials, no network.

cfn-lint (1.54 and later) no longer runs the SAM translator, so the template is also transformed
here with aws-sam-translator and the CloudFormation it yields is linted too: that catches errors in
what SAM generates, which linting the source alone misses. A local CodeUri is swapped for a
placeholder, as `sam validate` does, and managed policies must be referenced by ARN.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from samtranslator.model.exceptions import InvalidDocumentException
from samtranslator.translator.transform import transform
from samtranslator.yaml_helper import yaml_parse


class _NoIamLoader:
    """Would call iam:ListPolicies to resolve managed policies given by name; we give ARNs."""

    def load(self) -> dict[str, str]:
        return {}


def transform_template(path: Path, region: str = "us-east-1") -> dict[str, Any]:
    template = yaml_parse(path.read_text())
    for resource in template.get("Resources", {}).values():
        properties = resource.get("Properties") or {}
        if resource.get("Type") == "AWS::Serverless::Function" and not str(properties.get("CodeUri", "")).startswith(
            "s3://"
        ):
            properties["CodeUri"] = "s3://placeholder-bucket/code.zip"
    parameters = {"AWS::Region": region, "AWS::AccountId": "123456789012", "AWS::Partition": "aws"}
    try:
        result: dict[str, Any] = transform(template, parameters, _NoIamLoader())
    except InvalidDocumentException as error:
        raise ValueError("; ".join(cause.message for cause in error.causes)) from None
    return result


if __name__ == "__main__":
    json.dump(transform_template(Path(sys.argv[1] if len(sys.argv) > 1 else "template.yaml")), sys.stdout, indent=1)
