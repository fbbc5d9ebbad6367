"""Helpers for the interoperability tests: real mail clients and a private Dovecot."""
