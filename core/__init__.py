"""Parley's core: everything the entry points in `handlers/` use. Never imports `handlers`."""
