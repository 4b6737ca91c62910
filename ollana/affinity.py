"""The affinity key of a conversation: what stays the same from one turn to the next.

Ollama keeps a prompt cache per slot, and a chat app sends the whole conversation again at
each turn, so the server that served turn 1 evaluates only the new part of turn 2. The key
is a hash of the model and the conversation's stable start: its first system message and
first user message (/api/chat, /v1/chat/completions), or its system prompt and the start
of its prompt (/api/generate, /v1/completions). Only bodies of at most KEY_LIMIT bytes get
a key: they are parsed whole, once they are in.
"""

from __future__ import annotations

import hashlib
import json

KEY_LIMIT = 256 * 1024  # bytes of a body parsed for its key (a few ms at most)
PROMPT_START = 512  # characters of a prompt that stand for its start
CHAT_PATHS = frozenset({b"/api/chat", b"/v1/chat/completions"})
PROMPT_PATHS = frozenset({b"/api/generate", b"/v1/completions"})


def wants_key(path: bytes) -> bool:
    """Whether requests to path (a request-target) are turns of a conversation."""
    path = path.partition(b"?")[0]
    return path in CHAT_PATHS or path in PROMPT_PATHS


def conversation_key(path: bytes, model: str, body: bytes) -> str | None:
    """The affinity key of a request's body, or None when it has no conversation to keep."""
    if len(body) > KEY_LIMIT:
        return None
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested too deep to parse
        return None
    if not isinstance(request, dict):
        return None
    path = path.partition(b"?")[0]
    parts = _chat_start(request) if path in CHAT_PATHS else _prompt_start(request)
    if not any(parts):
        return None
    text = "\0".join([model, *parts])
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _chat_start(request: dict[str, object]) -> list[str]:
    system = user = ""
    messages = request.get("messages")
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, dict):
            continue
        role, content = message.get("role"), _text(message.get("content"))
        if role == "system" and not system:
            system = content
        elif role == "user":
            user = content
            break
    return [system, user]


def _prompt_start(request: dict[str, object]) -> list[str]:
    return [_text(request.get("system")), _text(request.get("prompt"))[:PROMPT_START]]


def _text(value: object) -> str:
    """A message's content as text: a string, or the text parts of an OpenAI-style list."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(
            part["text"]
            for part in value
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""
