"""The node daemon: claims jobs for its Ollama when a slot is free, runs them, heartbeats."""
