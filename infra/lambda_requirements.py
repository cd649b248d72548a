"""Print the webhook Lambda's requirements (or, with --all, the media image's: every runtime one),
pinned as pyproject.toml pins them: the inputs of `make lock`.

The Lambda bundle holds core/ and handlers/ and only what the webhook imports; numpy, websockets,
the openai SDK and uvloop (the media service's) and every test-only package stay out of it.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

WEBHOOK_NEEDS = {"litestar", "mangum", "msgspec", "aws-lambda-powertools", "python-dotenv", "boto3"}

if __name__ == "__main__":
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    for requirement in pyproject["project"]["dependencies"]:
        if "--all" in sys.argv[1:] or requirement.split("==")[0].split(";")[0].strip() in WEBHOOK_NEEDS:
            print(requirement)
