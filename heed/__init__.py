"""Heed: a local chat assistant that learns each user's preferences from their feedback."""

__version__ = "0.1.0"
