"""Settings: defaults, typing, the `.env` file, and one-line errors naming the variable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from core.config import (
    ConfigError,
    ConversationSettings,
    MediaSettings,
    ProviderSettings,
    WebhookSettings,
    load_settings,
    normalize_word,
    read_environment,
    secret_values,
)

WEBHOOK_ENV = {
    "TWILIO_AUTH_TOKEN": "tok-123456",
    "MEDIA_STREAM_URL": "wss://media.example.com/media",
    "CALLS_TABLE": "calls",
}
PROVIDER_ENV = {"DEEPGRAM_API_KEY": "dg-key-1", "OPENAI_API_KEY": "sk-key-1", "ELEVENLABS_API_KEY": "el-key-1"}


def test_defaults_of_design_section_3() -> None:
    conversation = ConversationSettings.from_env({})
    assert conversation.silence_threshold == 2.0
    assert conversation.barge_in_min_speech_ms == 150
    assert conversation.speculate_after_ms == 400
    providers = ProviderSettings.from_env(PROVIDER_ENV)
    assert providers.deepgram_url == "wss://api.deepgram.com/v1/listen"
    assert providers.deepgram_model == "nova-3"
    assert providers.openai_base_url is None
    assert providers.openai_model == "gpt-4o-mini"
    assert providers.elevenlabs_url == "wss://api.elevenlabs.io"
    assert providers.elevenlabs_model_id == "eleven_flash_v2_5"
    assert providers.elevenlabs_output_format == "ulaw_8000"
    webhook = WebhookSettings.from_env(WEBHOOK_ENV)
    assert webhook.public_base_url is None


def test_each_process_asks_only_for_what_it_uses() -> None:
    WebhookSettings.from_env(WEBHOOK_ENV)  # no provider keys needed
    MediaSettings.from_env(WEBHOOK_ENV)  # no PUBLIC_BASE_URL needed


@pytest.mark.parametrize(
    ("cls", "env", "variable", "fragment"),
    [
        (WebhookSettings, {**WEBHOOK_ENV, "TWILIO_AUTH_TOKEN": ""}, "TWILIO_AUTH_TOKEN", "is not set"),
        (WebhookSettings, {k: v for k, v in WEBHOOK_ENV.items() if k != "CALLS_TABLE"}, "CALLS_TABLE", "not set"),
        (WebhookSettings, {**WEBHOOK_ENV, "MEDIA_STREAM_URL": "https://x/media"}, "MEDIA_STREAM_URL", "wss"),
        (WebhookSettings, {**WEBHOOK_ENV, "PUBLIC_BASE_URL": "ftp://x"}, "PUBLIC_BASE_URL", "https"),
        (ConversationSettings, {"SILENCE_THRESHOLD": "two"}, "SILENCE_THRESHOLD", "seconds"),
        (ConversationSettings, {"SILENCE_THRESHOLD": "-1"}, "SILENCE_THRESHOLD", "not > 0"),
        (ConversationSettings, {"BARGE_IN_MIN_SPEECH_MS": "1.5"}, "BARGE_IN_MIN_SPEECH_MS", "milliseconds"),
        (
            ProviderSettings,
            {**PROVIDER_ENV, "ELEVENLABS_OUTPUT_FORMAT": "mp3"},
            "ELEVENLABS_OUTPUT_FORMAT",
            "ulaw_8000",
        ),
        (ProviderSettings, {"OPENAI_API_KEY": "x", "ELEVENLABS_API_KEY": "y"}, "DEEPGRAM_API_KEY", "not set"),
    ],
)
def test_a_bad_value_fails_with_one_line_naming_it(
    cls: type, env: dict[str, str], variable: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        cls.from_env(env)
    message = str(caught.value)
    assert caught.value.variable == variable
    assert message.startswith(f"{variable}: ")
    assert fragment in message
    assert "\n" not in message


def test_a_malformed_secret_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as caught:
        ProviderSettings.from_env({**PROVIDER_ENV, "DEEPGRAM_API_KEY": "   "})
    assert "<hidden>" in str(caught.value)


def test_dotenv_file_is_read_under_the_real_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("SILENCE_THRESHOLD=1.5\nGREETING='Hi from .env'\n")
    monkeypatch.setenv("GREETING", "Hi from the environment")
    merged = read_environment(env_file)
    assert merged["SILENCE_THRESHOLD"] == "1.5"
    assert merged["GREETING"] == "Hi from the environment"
    assert ConversationSettings.from_env(merged).silence_threshold == 1.5


def test_secret_values_are_listed_for_redaction() -> None:
    assert sorted(secret_values(ProviderSettings.from_env(PROVIDER_ENV))) == sorted(PROVIDER_ENV.values())


@pytest.mark.parametrize(
    ("env", "variable", "problem"),
    [
        ({"RESUME_WINDOW_MS": "500"}, "RESUME_WINDOW_MS", "shorter than BARGE_IN_CONFIRM_MS (700 ms)"),
        ({"BARGE_IN_CONFIRM_MS": "1500"}, "RESUME_WINDOW_MS", "1200 ms is shorter"),
        ({"BARGE_IN_CONFIRM_MS": "-1"}, "BARGE_IN_CONFIRM_MS", "is negative"),
        ({"RESUME_WINDOW_MS": "soon"}, "RESUME_WINDOW_MS", "invalid literal"),
        ({"BACKCHANNEL_WORDS": " , ,"}, "BACKCHANNEL_WORDS", "has no words"),
    ],
)
def test_barge_in_settings_out_of_range_stop_the_start_naming_the_variable(
    env: dict[str, str], variable: str, problem: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(problem)) as raised:
        ConversationSettings.from_env(env)
    assert raised.value.variable == variable and str(raised.value).startswith(f"{variable}: ")


def test_backchannel_words_are_compared_as_deepgram_writes_them() -> None:
    settings = ConversationSettings.from_env({"BACKCHANNEL_WORDS": "Mm-hm., Uh-huh , OKAY,okay"})
    assert settings.backchannel_words == ("mm-hm", "uh-huh", "okay")
    assert normalize_word("Right,") == "right" and normalize_word('"Yeah!"') == "yeah"


@pytest.mark.parametrize("url", ["wss://media.example.com/media?token=x", "wss://media.example.com/media#a"])
def test_a_media_stream_url_with_a_query_string_is_refused_at_start_up(url: str) -> None:
    env = {"TWILIO_AUTH_TOKEN": "t", "MEDIA_STREAM_URL": url, "CALLS_TABLE": "calls"}
    with pytest.raises(ConfigError, match=r"MEDIA_STREAM_URL: .* Twilio strips or rejects") as raised:
        MediaSettings.from_env(env)
    assert raised.value.variable == "MEDIA_STREAM_URL"


def test_every_missing_setting_of_a_process_is_named_in_one_line() -> None:
    """Five missing settings across the media service's three groups, and no region: one message."""
    with pytest.raises(ConfigError) as raised:
        load_settings(MediaSettings, ProviderSettings, ConversationSettings, env={"CALLS_TABLE": "c"}, aws_region=True)
    message = str(raised.value)
    assert "\n" not in message and message.startswith("6 settings need attention: ")
    expected = [
        "MEDIA_STREAM_URL",
        "TWILIO_AUTH_TOKEN",
        "DEEPGRAM_API_KEY",
        "OPENAI_API_KEY",
        "ELEVENLABS_API_KEY",
        "AWS_DEFAULT_REGION",
    ]
    assert raised.value.variables == expected
    assert all(f"{variable}: " in message for variable in expected)


def test_a_malformed_value_is_echoed_once_and_a_secret_never() -> None:
    env = {**WEBHOOK_ENV, **PROVIDER_ENV, "CALL_TTL_DAYS": "-3", "OPENAI_API_KEY": " "}
    with pytest.raises(ConfigError) as raised:
        load_settings(WebhookSettings, ProviderSettings, env=env)
    message = str(raised.value)
    assert message.count("'-3'") == 1 and "OPENAI_API_KEY: is empty (got <hidden>)" in message


def test_no_aws_region_is_one_line_naming_aws_default_region() -> None:
    with pytest.raises(ConfigError, match=r"^AWS_DEFAULT_REGION: is not set") as raised:
        load_settings(WebhookSettings, env=WEBHOOK_ENV, aws_region=True)
    assert raised.value.variables == ["AWS_DEFAULT_REGION"]
    (settings,) = load_settings(WebhookSettings, env={**WEBHOOK_ENV, "AWS_REGION": "eu-west-1"}, aws_region=True)
    assert settings.calls_table == "calls"


def test_the_env_files_aws_settings_reach_boto3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new user's .env names the region and a local DynamoDB; boto3 reads only the process environment."""
    import os

    env_file = tmp_path / ".env"
    env_file.write_text("AWS_ENDPOINT_URL_DYNAMODB=http://127.0.0.1:4566\nAWS_DEFAULT_REGION=eu-west-3\nGREETING=Hi\n")
    environment = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL_DYNAMODB"}
    monkeypatch.setattr(os, "environ", {**environment, "AWS_DEFAULT_REGION": "us-east-1"})  # restored after
    read_environment(env_file)
    assert os.environ["AWS_ENDPOINT_URL_DYNAMODB"] == "http://127.0.0.1:4566"
    assert os.environ["AWS_DEFAULT_REGION"] == "us-east-1"  # the real environment wins
    assert os.environ.get("GREETING") != "Hi"  # only boto3's settings are exported
