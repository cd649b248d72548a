"""Local emulators of Deepgram, OpenAI and ElevenLabs, speaking their wire protocols on loopback."""
