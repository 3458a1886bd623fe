"""What the running operator was started with, for kopf handlers to read.

kopf calls handlers with framework arguments only, so the settings parsed once at startup and
the API client made once (see ``__main__``) are kept here rather than rebuilt per call.
"""

from typing import Any

from dbgov_operator import settings

_current: settings.Settings | None = None
_client: Any = None


def configure(config: settings.Settings, *, client: Any = None) -> None:
    """Install the settings and API client for this process (once at startup, or by tests)."""
    global _current, _client
    _current, _client = config, client


def current() -> settings.Settings:
    """The settings installed by :func:`configure`; defaults if none were."""
    return _current if _current is not None else settings.Settings()


def client() -> Any:
    """The ``kubernetes.client.ApiClient`` installed by :func:`configure`."""
    if _client is None:
        raise RuntimeError("the operator's API client is not configured")
    return _client
