"""Corral: a Redis-backed job queue in front of a fleet of Ollama servers.

This package holds what every Corral process shares: settings, the Redis key
schema, job and message formats, Lua scripts and the ``corral`` command line.
It never imports ``gateway``, ``worker`` or ``scheduler``; only the CLI
dispatches to them, lazily.
"""

__version__ = "0.1.0"
