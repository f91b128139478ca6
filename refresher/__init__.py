"""refresher: an event-driven daemon that keeps short-lived API tokens fresh."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("refresher")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["__version__"]
