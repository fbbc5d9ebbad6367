"""Mailfort: a privacy-first mail service."""

__version__ = "0.1.0"
