"""Test servers (an OpenAI-compatible stub) started by fixtures on 127.0.0.1."""
