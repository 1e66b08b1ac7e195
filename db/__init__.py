"""Persistence: SQLAlchemy models, engine/session handling and repository functions. Never imports core.models."""
