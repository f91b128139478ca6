"""Token sinks: where a fresh token is published."""
