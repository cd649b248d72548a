"""Twilio's auth token as the processes use it: read when needed, so that a rotation reaches them.

Resolved into the environment at deploy time, the token went stale the moment the secret rotated,
and every webhook answered 403 until an unrelated deploy. With `TWILIO_AUTH_TOKEN_SECRET` (a Secrets
Manager secret's ARN, whose JSON has `twilio_auth_token`) the token is read at run time through
Powertools' parameters utility, cached for `max_age_s`; and when a signature or a stream token fails
with the cached token, the secret is read again at once (at most every `refresh_floor_s`, so bad
requests cannot hammer Secrets Manager) and the check tried once more with the new token. Without the
variable, `TWILIO_AUTH_TOKEN` is the token, as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

SECRET_KEY = "twilio_auth_token"


class SecretsManagerReader:
    """Reads `twilio_auth_token` from the secret; called with `True` it skips Powertools' cache."""

    def __init__(self, secret_arn: str, max_age_s: int) -> None:
        self.secret_arn = secret_arn
        self.max_age_s = max_age_s
        self._provider: Any = None

    def prepare(self) -> None:
        """Make the Secrets Manager client (~100 ms of botocore), reading nothing: for SnapStart's
        snapshot, which must hold no secret."""
        if self._provider is None:
            from aws_lambda_powertools.utilities.parameters import SecretsProvider

            self._provider = SecretsProvider()

    def __call__(self, force: bool) -> str:
        self.prepare()
        value = self._provider.get(self.secret_arn, transform="json", max_age=self.max_age_s, force_fetch=force)
        if not isinstance(value, dict) or not isinstance(value.get(SECRET_KEY), str) or not value[SECRET_KEY]:
            raise ValueError(f"the secret {self.secret_arn} has no {SECRET_KEY!r} string in its JSON")
        return str(value[SECRET_KEY])


def secrets_manager_reader(secret_arn: str, max_age_s: int) -> SecretsManagerReader:
    return SecretsManagerReader(secret_arn, max_age_s)


class AuthToken:
    """The token to sign and check with now, and, when a check fails, the one to try next."""

    def __init__(
        self,
        fixed: str = "",
        read: Callable[[bool], str] | None = None,
        *,
        refresh_floor_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not fixed and read is None:
            raise ValueError("an auth token needs a value or a secret to read it from")
        self._fixed = fixed
        self._read = read
        self._refresh_floor_s = refresh_floor_s
        self._clock = clock
        self._last_forced: float | None = None

    def prepare(self) -> None:
        """Everything but the read (see `SecretsManagerReader.prepare`)."""
        prepare = getattr(self._read, "prepare", None)
        if prepare is not None:
            prepare()

    def current(self) -> str:
        return self._read(False) if self._read is not None else self._fixed

    def accepts(self, check: Callable[[str], bool]) -> bool:
        """Whether `check` passes with the current token or, once it failed, with a fresh read."""
        return any(check(token) for token in self.candidates())

    def candidates(self) -> Iterator[str]:
        """The current token, then, if a check with it failed and the floor allows, a fresh read of the
        secret when it differs: a rotation is followed at the first request signed with the new token."""
        current = self.current()
        yield current
        if self._read is None:
            return
        now = self._clock()
        if self._last_forced is not None and now - self._last_forced < self._refresh_floor_s:
            return
        self._last_forced = now
        fresh = self._read(True)
        if fresh != current:
            yield fresh
