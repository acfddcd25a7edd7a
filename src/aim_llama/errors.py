"""Exceptions raised by aim-llama (only in strict mode; the default path logs instead)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A setting is invalid; the message is one line naming the setting, its source and what is allowed."""

    def __init__(self, message: str, *, setting: str | None = None, source: str | None = None):
        super().__init__(message)
        self.setting = setting
        self.source = source
