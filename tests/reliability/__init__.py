"""Reliability and security fault matrix (issue 8): see README.md in this directory."""
