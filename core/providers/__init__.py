"""Asyncio clients for the speech and language providers (Deepgram, OpenAI, ElevenLabs)."""
