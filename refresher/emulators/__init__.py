"""Loopback emulators of the partner token APIs.

Real HTTP servers (uvicorn in a background thread) that issue real JWTs, enforce
rate limits and inject faults on request. Tests, the benchmark and
``refresher demo`` talk to them over the real wire format instead of mocks.
"""

from refresher.emulators.base import Emulator, Fault, RecordedRequest

__all__ = ["Emulator", "Fault", "RecordedRequest"]
