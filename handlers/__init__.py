"""Thin entry points: the webhook app, the media app and the `parley` command line."""
