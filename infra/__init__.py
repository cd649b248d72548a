"""How Parley runs: the media image, dashboards, and the local stand-ins for the cloud."""
