"""The auth token as the processes read it: cached, read again once when a check fails, rate-limited."""

from __future__ import annotations

import pytest

from core.secrets import AuthToken


class Secret:
    def __init__(self, value: str) -> None:
        self.value, self.cached, self.reads = value, value, 0

    def read(self, force: bool) -> str:
        if force:
            self.reads += 1
            self.cached = self.value
        return self.cached


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_fixed_token_is_the_only_candidate() -> None:
    assert list(AuthToken("tok").candidates()) == ["tok"]
    with pytest.raises(ValueError, match="needs a value or a secret"):
        AuthToken()


def test_a_rotated_secret_is_read_again_when_the_cached_token_fails_and_not_more_than_the_floor_allows() -> None:
    secret, clock = Secret("old"), Clock()
    token = AuthToken(read=secret.read, refresh_floor_s=30, clock=clock)
    assert token.current() == "old"
    secret.value = "new"  # rotated; the cache still says old
    assert list(token.candidates()) == ["old", "new"] and token.current() == "new"
    clock.now = 10
    assert list(token.candidates()) == ["new"]  # a bad signature 10 s later reads nothing
    clock.now = 41
    assert list(token.candidates()) == ["new"] and secret.reads == 2  # read again, unchanged: not offered twice


def test_a_checker_that_stops_at_the_first_good_token_reads_nothing() -> None:
    secret = Secret("tok")
    token = AuthToken(read=secret.read, clock=Clock())
    assert any(candidate == "tok" for candidate in token.candidates()) and secret.reads == 0
