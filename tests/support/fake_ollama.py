"""The tests' fake Ollama: ollana.simulator, where it now lives, re-exported.

``python -m tests.support.fake_ollama --port N [--pace S] [--model NAME]...`` serves it on
loopback with the tests' defaults: the model ``llama3.2:latest``, no pacing.
"""

from __future__ import annotations

from ollana import simulator
from ollana.simulator import *  # noqa: F403 (the re-export is the point)
from ollana.simulator import CREATED, DEFAULT_MODELS, ECHO_MODEL, FakeOllama, SimulatedOllama

__all__ = ["CREATED", "DEFAULT_MODELS", "ECHO_MODEL", "FakeOllama", "SimulatedOllama", "main"]


def main(argv: list[str] | None = None) -> None:
    simulator.main(argv, label="fake Ollama", models=DEFAULT_MODELS, pace=0.0)


if __name__ == "__main__":
    main()
