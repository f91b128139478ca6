"""Reliability and security fault matrix: see README.md in this directory."""
