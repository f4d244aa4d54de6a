"""The HTTP gateway: the Ollama API, the OpenAI API and Corral's own job API, over Redis."""
