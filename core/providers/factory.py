"""The vendors' providers built from the settings: the one place their URLs and call options are made.

`VendorProviders` is the production `ProviderFactory`: Deepgram for speech-to-text, OpenAI for the
chat model, ElevenLabs for text-to-speech. `parley check` builds its URLs with the same functions,
so what is checked is what a call uses.
"""

from __future__ import annotations

from core.config import ProviderSettings
from core.providers.deepgram import DeepgramStream, listen_url
from core.providers.elevenlabs import ElevenLabsStream, stream_url
from core.providers.openai import OpenAiChat, OpenAiReplies
from core.providers.roles import CallContext, CallProviders

# Deepgram's endpointing: the silence after which it marks `speech_final` (speculation may start on it).
ENDPOINTING_MS = 300
# ElevenLabs closes a socket idle this long; a call's socket idles while the caller talks.
TTS_INACTIVITY_TIMEOUT_S = 180


def stt_url(settings: ProviderSettings, *, silence_threshold_ms: int, call_sid: str | None = None) -> str:
    return listen_url(
        settings.deepgram_url,
        model=settings.deepgram_model,
        utterance_end_ms=silence_threshold_ms,
        endpointing_ms=ENDPOINTING_MS,
        tag=call_sid,
    )


def tts_url(settings: ProviderSettings, *, inactivity_timeout_s: int = TTS_INACTIVITY_TIMEOUT_S) -> str:
    return stream_url(
        settings.elevenlabs_url,
        settings.elevenlabs_voice_id,
        model_id=settings.elevenlabs_model_id,
        output_format=settings.elevenlabs_output_format,
        inactivity_timeout=inactivity_timeout_s,
    )


class VendorProviders:
    """Deepgram, OpenAI and ElevenLabs for each call; one OpenAI client shared by all calls."""

    def __init__(self, settings: ProviderSettings) -> None:
        self.settings = settings
        self.chat = OpenAiChat(settings.openai_api_key, settings.openai_model, settings.openai_base_url)

    def for_call(self, call: CallContext) -> CallProviders:
        settings = self.settings
        return CallProviders(
            stt=DeepgramStream(
                stt_url(settings, silence_threshold_ms=call.silence_threshold_ms, call_sid=call.call_sid),
                settings.deepgram_api_key,
                call.on_event,
                call.now_ms,
            ),
            chat=OpenAiReplies(self.chat, call.on_event, call.now_ms),
            tts=ElevenLabsStream(
                tts_url(settings),
                settings.elevenlabs_api_key,
                settings.elevenlabs_output_format,
                call.on_event,
                call.now_ms,
            ),
        )

    async def aclose(self) -> None:
        await self.chat.close()
