"""Settings from the environment (and an optional `.env` file), typed and checked at start-up.

Each process asks only for what it uses: `WebhookSettings` for the Lambda, `MediaSettings` for the
media service, `ProviderSettings` for `parley check`. Every field names its variable, how to read
it and its default in one place (the field's metadata), so the table in DESIGN.md section 3 and
this file cannot drift apart silently. A missing or malformed value raises `ConfigError` whose
message is one line: the variable, what was wrong, and what is expected. A process loads all its
settings with one `load_settings`, so five missing variables are named in one message, not found one
deploy at a time; a malformed value is echoed once (secrets never).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit

from core.secrets import AuthToken, secrets_manager_reader
from core.tools import ToolSpec, load_tools_file, parse_destinations

T = TypeVar("T")

_REQUIRED = object()


class ConfigError(Exception):
    """Settings are missing or malformed; the one-line message names each variable and what is expected."""

    def __init__(self, variable: str, problem: str, expected: str) -> None:
        self.variables = [variable]
        self.problems = [f"{variable}: {problem}; expected {expected}"]
        super().__init__(self.problems[0])

    @property
    def variable(self) -> str:
        return ", ".join(self.variables)

    @classmethod
    def together(cls, errors: Sequence[ConfigError]) -> ConfigError:
        """One error naming every problem of `errors`, in the order found."""
        if len(errors) == 1:
            return errors[0]
        joined = cls.__new__(cls)
        joined.variables = [variable for error in errors for variable in error.variables]
        joined.problems = [problem for error in errors for problem in error.problems]
        Exception.__init__(joined, f"{len(joined.problems)} settings need attention: " + " | ".join(joined.problems))
        return joined


@dataclasses.dataclass(frozen=True)
class _Spec:
    variable: str
    parse: Callable[[str], Any]
    expected: str
    default: object
    secret: bool


def setting(
    variable: str,
    parse: Callable[[str], T],
    expected: str,
    default: object = _REQUIRED,
    *,
    secret: bool = False,
) -> Any:
    """Declare a dataclass field read from `variable`; `default` is the raw text (or omitted: required)."""
    return dataclasses.field(
        metadata={"spec": _Spec(variable, parse, expected, default, secret)},
    )


# -- parsers: each raises ValueError with a short reason -------------------------------------------


def text(raw: str) -> str:
    if not raw.strip():
        raise ValueError("is empty")
    return raw


def optional_text(raw: str) -> str:
    return raw


def positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError(f"{raw!r} is not > 0")
    return value


def non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError(f"{raw!r} is negative")
    return value


def minutes_of_protection(raw: str) -> int:
    value = int(raw)
    if not 1 <= value <= 2880:  # the ECS agent's bounds for ExpiresInMinutes
        raise ValueError(f"{value} is not between 1 and 2880")
    return value


def optional_secret_arn(raw: str) -> str:
    arn = raw.strip()
    if arn and not (arn.startswith("arn:") and ":secretsmanager:" in arn):
        raise ValueError(f"{raw!r} is not a Secrets Manager ARN")
    return arn


def url_with_scheme(*schemes: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        parts = urlsplit(raw)
        if parts.scheme not in schemes or not parts.netloc:
            raise ValueError(f"{raw!r} is not a {'/'.join(schemes)} URL with a host")
        return raw.rstrip("/") if parts.path in ("", "/") else raw

    return parse


def stream_url(raw: str) -> str:
    """Twilio's `<Stream url>` takes no query string: it strips or rejects one (pass values as
    `<Parameter>`s instead), so a URL with one would never reach the media service as written."""
    url = url_with_scheme("wss")(raw)
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise ValueError(f"{raw!r} has a query string or fragment, which Twilio strips or rejects")
    return url


def optional_url(*schemes: str) -> Callable[[str], str | None]:
    checked = url_with_scheme(*schemes)

    def parse(raw: str) -> str | None:
        return checked(raw) if raw.strip() else None

    return parse


def word_list(raw: str) -> tuple[str, ...]:
    """Comma-separated words, compared as `normalize_word` leaves them."""
    words = tuple(dict.fromkeys(normalize_word(word) for word in raw.split(",") if normalize_word(word)))
    if not words:
        raise ValueError("has no words")
    return words


def normalize_word(word: str) -> str:
    """A word as the engine compares it: lower case, no surrounding punctuation ("Mm-hm." -> "mm-hm")."""
    return word.strip().strip(".,!?;:\"'()").lower()


def one_of(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in choices:
            raise ValueError(f"{raw!r} is not one of them")
        return raw

    return parse


# -- loading ----------------------------------------------------------------------------------------


def read_environment(env_file: str | Path | None = ".env") -> dict[str, str]:
    """The process environment over the optional `.env` file (the real environment wins)."""
    merged: dict[str, str] = {}
    if env_file is not None and Path(env_file).is_file():
        from dotenv import dotenv_values

        from_file = {k: v for k, v in dotenv_values(env_file).items() if v is not None}
        merged.update(from_file)
        # boto3 reads its settings (region, keys, AWS_ENDPOINT_URL_DYNAMODB) from the process
        # environment only: the file's AWS_ ones are exported, unless the environment has them.
        for name, value in from_file.items():
            if name.startswith("AWS_"):
                os.environ.setdefault(name, value)
    merged.update(os.environ)
    return merged


C = TypeVar("C")


def _load(cls: type[C], env: Mapping[str, str] | None) -> C:
    source = read_environment() if env is None else env
    values: dict[str, Any] = {}
    problems: list[ConfigError] = []
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        spec: _Spec = field.metadata["spec"]
        raw = source.get(spec.variable)
        if raw is None:
            if spec.default is _REQUIRED:
                problems.append(ConfigError(spec.variable, "is not set", spec.expected))
                continue
            raw = str(spec.default)
        try:
            values[field.name] = spec.parse(raw)
        except ValueError as error:
            problems.append(ConfigError(spec.variable, _malformed(raw, str(error), secret=spec.secret), spec.expected))
    cross_checks: Callable[[Mapping[str, Any]], list[ConfigError]] | None = getattr(cls, "cross_checks", None)
    if cross_checks is not None:
        problems.extend(cross_checks(values))
    if problems:
        raise ConfigError.together(problems)
    return cls(**values)  # __post_init__ checks values against each other, once each is sound


def _malformed(raw: str, reason: str, *, secret: bool) -> str:
    """What was wrong, with the value shown once (a parser may have quoted it already), a secret never."""
    if secret:
        return "is malformed (got <hidden>)" if raw.strip() and raw.strip() in reason else f"{reason} (got <hidden>)"
    return reason if repr(raw) in reason else f"{reason} (got {raw!r})"


def load_settings(
    *classes: type[Any], env: Mapping[str, str] | None = None, aws_region: bool = False
) -> tuple[Any, ...]:
    """Each of `classes` from the environment, with every problem of all of them in one `ConfigError`;
    `aws_region` also asks that boto3 can find a region (else its `NoRegionError` is a traceback at the
    first client). A given `env` is the whole environment: the AWS profile is not read then."""
    source = read_environment() if env is None else env
    loaded: list[Any] = []
    problems: list[ConfigError] = []
    for cls in classes:
        try:
            loaded.append(cls.from_env(source))
        except ConfigError as error:
            problems.append(error)
    region = source.get("AWS_REGION") or source.get("AWS_DEFAULT_REGION") or (env is None and _profile_region())
    if aws_region and not region:
        problems.append(
            ConfigError(
                "AWS_DEFAULT_REGION", "is not set (nor AWS_REGION, nor a region in the AWS profile)", "e.g. us-east-1"
            )
        )
    if problems:
        raise ConfigError.together(problems)
    return tuple(loaded)


def _profile_region() -> str | None:
    import botocore.session

    region: str | None = botocore.session.get_session().get_config_variable("region")
    return region


def secret_values(settings: object) -> list[str]:
    """The values of every field marked secret, for the log redactor."""
    found = []
    for field in dataclasses.fields(settings):  # type: ignore[arg-type]
        if field.metadata["spec"].secret:
            value = getattr(settings, field.name)
            if isinstance(value, str) and value:
                found.append(value)
    return found


_SECONDS = "a number of seconds > 0, e.g. 2.0"
_MS = "a whole number of milliseconds >= 0, e.g. 150"


@dataclasses.dataclass(frozen=True)
class _TwilioAndBooks:
    """What both processes read: Twilio's token, the stream URL it signs, the calls table."""

    twilio_auth_token: str = setting(
        "TWILIO_AUTH_TOKEN",
        optional_text,
        "the Twilio account's auth token (or TWILIO_AUTH_TOKEN_SECRET)",
        "",
        secret=True,
    )
    twilio_auth_token_secret: str = setting(
        "TWILIO_AUTH_TOKEN_SECRET",
        optional_secret_arn,
        "the ARN of a Secrets Manager secret whose JSON has twilio_auth_token, read at run time, or empty",
        "",
    )
    twilio_auth_token_max_age_s: int = setting(
        "TWILIO_AUTH_TOKEN_MAX_AGE_SECONDS",
        non_negative_int,
        "how long the token read from TWILIO_AUTH_TOKEN_SECRET is cached, e.g. 300",
        "300",
    )
    twilio_webhook_shared_key: str = setting(
        "TWILIO_WEBHOOK_SHARED_KEY",
        optional_text,
        "the SharedKey secret of the Webhooks Rule that signs Twilio's requests, or empty when none does",
        "",
        secret=True,
    )
    media_stream_url: str = setting(
        "MEDIA_STREAM_URL", stream_url, "the media service's public wss://host/media URL, with no query string"
    )
    calls_table: str = setting("CALLS_TABLE", text, "the DynamoDB calls table's name")
    call_ttl_days: float = setting("CALL_TTL_DAYS", positive_float, "how many days a call item is kept, e.g. 30", "30")

    @staticmethod
    def cross_checks(values: Mapping[str, Any]) -> list[ConfigError]:
        """Problems between fields, from what parsed (so they are named with every other problem)."""
        if not values.get("twilio_auth_token", "").strip() and not values.get("twilio_auth_token_secret"):
            return [
                ConfigError(
                    "TWILIO_AUTH_TOKEN",
                    "is not set (nor TWILIO_AUTH_TOKEN_SECRET)",
                    "the Twilio account's auth token, or the ARN of the secret that holds it",
                )
            ]
        return []

    def auth_token(self) -> AuthToken:
        """The token to sign and check with: read at run time from the secret when one is named."""
        if self.twilio_auth_token_secret:
            reader = secrets_manager_reader(self.twilio_auth_token_secret, self.twilio_auth_token_max_age_s)
            return AuthToken(read=reader)
        return AuthToken(self.twilio_auth_token)


@dataclasses.dataclass(frozen=True)
class WebhookSettings(_TwilioAndBooks):
    """What the webhook Lambda reads. It needs no provider keys."""

    public_base_url: str | None = setting(
        "PUBLIC_BASE_URL",
        optional_url("https"),
        "the webhook's public https:// base URL, or empty to rebuild it from the request",
        "",
    )

    transfer_ring_seconds: int = setting(
        "TRANSFER_RING_SECONDS",
        non_negative_int,
        "how long a transfer rings before it counts as no-answer, e.g. 20",
        "20",
    )
    stream_resumes: int = setting(
        "STREAM_RESUMES", non_negative_int, "how many times a call whose stream was lost is reconnected, e.g. 2", "2"
    )
    stream_token_ttl_seconds: int = setting(
        "STREAM_TOKEN_TTL_SECONDS", non_negative_int, "how long a stream token is valid in seconds, e.g. 600", "600"
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Self:
        return _load(cls, env)


@dataclasses.dataclass(frozen=True)
class ProviderSettings:
    """Where and how to reach the three providers; shared by the media service and `parley check`."""

    deepgram_api_key: str = setting("DEEPGRAM_API_KEY", text, "a Deepgram API key", secret=True)
    deepgram_url: str = setting(
        "DEEPGRAM_URL",
        url_with_scheme("wss", "ws"),
        "a wss:// (or ws:// for a local emulator) listen endpoint",
        "wss://api.deepgram.com/v1/listen",
    )
    deepgram_model: str = setting("DEEPGRAM_MODEL", text, "a Deepgram model name", "nova-3")
    openai_api_key: str = setting("OPENAI_API_KEY", text, "an OpenAI API key", secret=True)
    openai_base_url: str | None = setting(
        "OPENAI_BASE_URL",
        optional_url("https", "http"),
        "an http(s):// API base such as https://api.openai.com/v1, or empty for the SDK default",
        "",
    )
    openai_model: str = setting("OPENAI_MODEL", text, "an OpenAI chat model name", "gpt-4o-mini")
    elevenlabs_api_key: str = setting("ELEVENLABS_API_KEY", text, "an ElevenLabs API key", secret=True)
    elevenlabs_url: str = setting(
        "ELEVENLABS_URL",
        url_with_scheme("wss", "ws"),
        "a wss:// (or ws:// for a local emulator) API base",
        "wss://api.elevenlabs.io",
    )
    elevenlabs_voice_id: str = setting("ELEVENLABS_VOICE_ID", text, "an ElevenLabs voice id", "21m00Tcm4TlvDq8ikWAM")
    elevenlabs_model_id: str = setting("ELEVENLABS_MODEL_ID", text, "an ElevenLabs model id", "eleven_flash_v2_5")
    elevenlabs_output_format: str = setting(
        "ELEVENLABS_OUTPUT_FORMAT",
        one_of("ulaw_8000", "pcm_16000", "pcm_24000"),
        "ulaw_8000, pcm_16000 or pcm_24000",
        "ulaw_8000",
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Self:
        return _load(cls, env)


@dataclasses.dataclass(frozen=True)
class ConversationSettings:
    """The turn-taking rules of DESIGN.md section 2 and the agent's words."""

    system_prompt: str = setting(
        "SYSTEM_PROMPT",
        text,
        "the agent's instructions",
        "You are a friendly, concise phone assistant. Answer in one or two short spoken sentences.",
    )
    greeting: str = setting("GREETING", optional_text, "the agent's first words", "Hello! How can I help?")
    silence_threshold: float = setting("SILENCE_THRESHOLD", positive_float, _SECONDS, "2.0")
    barge_in_min_speech_ms: int = setting("BARGE_IN_MIN_SPEECH_MS", non_negative_int, _MS, "150")
    speculate_after_ms: int = setting("SPECULATE_AFTER_MS", non_negative_int, _MS, "400")
    vad_margin_db: float = setting(
        "VAD_MARGIN_DB", positive_float, "decibels above the noise floor that count as voice, e.g. 12", "12"
    )
    vad_min_level_dbfs: float = setting(
        "VAD_MIN_LEVEL_DBFS", float, "the quietest level ever taken as voice in dBFS, e.g. -50", "-50"
    )
    vad_min_speech_ms: int = setting(
        "VAD_MIN_SPEECH_MS", non_negative_int, "the shortest sound taken as speech in ms, e.g. 60", "60"
    )

    barge_in_confirm_ms: int = setting("BARGE_IN_CONFIRM_MS", non_negative_int, _MS, "700")
    resume_window_ms: int = setting("RESUME_WINDOW_MS", non_negative_int, _MS, "1200")
    backchannel_words: tuple[str, ...] = setting(
        "BACKCHANNEL_WORDS",
        word_list,
        "comma-separated words that never interrupt the agent, e.g. mm-hm,uh-huh,yeah,okay,right",
        "mm-hm,mm-hmm,mhm,mm,hmm,hm,uh-huh,uh,um,yeah,yep,yes,ok,okay,right,sure,alright",
    )

    goodbye: str = setting(
        "GOODBYE", text, "the agent's last words before it ends a call", "Thank you for calling. Goodbye!"
    )
    idle_reprompt: str = setting(
        "IDLE_REPROMPT", text, "what the agent says to a silent caller", "Are you still there?"
    )
    idle_reprompt_seconds: float = setting("IDLE_REPROMPT_SECONDS", positive_float, _SECONDS, "8")
    idle_max_reprompts: int = setting(
        "IDLE_MAX_REPROMPTS", non_negative_int, "how many reprompts before the agent hangs up, e.g. 2", "2"
    )
    max_call_seconds: float = setting(
        "MAX_CALL_SECONDS", positive_float, "the longest call in seconds, e.g. 1800", "1800"
    )
    transfer_destinations: Mapping[str, str] = setting(
        "TRANSFER_DESTINATIONS",
        parse_destinations,
        "comma-separated name=number pairs (E.164 or sip:), e.g. support=+15551230000,billing=+15551239999",
        "",
    )
    tools: tuple[ToolSpec, ...] = setting(
        "TOOLS_FILE",
        load_tools_file,
        'the path of a JSON list of {"name", "description", "parameters", "url", "timeout"} tools, or empty',
        "",
    )
    tool_filler_ms: int = setting("TOOL_FILLER_MS", non_negative_int, _MS, "1000")
    resume_line: str = setting(
        "RESUME_LINE",
        text,
        "what the agent says when a lost stream comes back",
        "Sorry, I lost you for a moment. Where were we?",
    )

    def __post_init__(self) -> None:
        if self.resume_window_ms < self.barge_in_confirm_ms:
            raise ConfigError(
                "RESUME_WINDOW_MS",
                f"{self.resume_window_ms} ms is shorter than BARGE_IN_CONFIRM_MS ({self.barge_in_confirm_ms} ms)",
                "a window at least as long as the confirmation, e.g. 1200 with 700",
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Self:
        return _load(cls, env)


@dataclasses.dataclass(frozen=True)
class MediaSettings(_TwilioAndBooks):
    """What the media service reads besides providers and rules: the upgrade check, the table, the drain."""

    drain_seconds: float = setting(
        "DRAIN_SECONDS", positive_float, "how long SIGTERM waits for live calls, e.g. 110", "110"
    )
    # Injected by ECS into every container; absent elsewhere, and then nothing is protected.
    ecs_agent_uri: str | None = setting(
        "ECS_AGENT_URI", optional_url("http", "https"), "the ECS agent's URI (ECS sets it), or empty", ""
    )
    task_protection_minutes: int = setting(
        "TASK_PROTECTION_MINUTES",
        minutes_of_protection,
        "how long each scale-in protection lasts before it is renewed at half of it, 1 to 2880, e.g. 60",
        "60",
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Self:
        return _load(cls, env)
