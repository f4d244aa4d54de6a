"""Model names as Ollama spells them."""

from __future__ import annotations


def normalize_model(name: str) -> str:
    """``llama3`` -> ``llama3:latest``; names with a tag (or a digest) are kept as they are."""
    name = name.strip()
    last = name.rsplit("/", 1)[-1]
    if not name or ":" in last or "@" in last:
        return name
    return f"{name}:latest"
