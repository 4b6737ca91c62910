"""Ollana: every Ollama on the LAN, usable from every device, with zero configuration."""

__version__ = "0.1.0"
