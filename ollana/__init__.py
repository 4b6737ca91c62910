"""Ollana: every Ollama on the LAN, usable from every device, with zero configuration."""

__version__ = "0.1.0"
DESCRIPTION = "Every Ollama on the LAN, from every device."  # twistd ollana --help
