"""Translators between client API formats and upstream API formats, one module per pair."""
