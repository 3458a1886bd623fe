"""The settings the running operator was started with, for kopf handlers to read.

kopf calls handlers by name with framework arguments only, so the settings parsed once at
startup (see ``__main__``) are kept here rather than re-read from the environment per call.
"""

from __future__ import annotations

from dbgov_operator import settings

_current: settings.Settings | None = None


def configure(config: settings.Settings) -> None:
    """Install the settings for this process (called once at startup, or by tests)."""
    global _current  # noqa: PLW0603 -- one process-wide value, set once
    _current = config


def current() -> settings.Settings:
    """The settings installed by :func:`configure`; defaults if none were."""
    return _current if _current is not None else settings.Settings()
