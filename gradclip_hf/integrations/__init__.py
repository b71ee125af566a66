"""Integrations with training frameworks (imported lazily: each pulls in its framework)."""
