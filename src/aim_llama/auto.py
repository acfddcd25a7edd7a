"""`import aim_llama.auto` — activate aim-llama for this process, with settings from env / TOML.

Cheap by design: if the kill switch is off it returns at once; otherwise it instruments now
when LlamaIndex is already imported, or waits (a post-import hook) until the application
imports `llama_index.core`. It never raises, unless strict mode is on.
"""

from __future__ import annotations

import os

from .importhook import when_imported

_FALSE = {"0", "false", "no", "off", "n", "f"}
_TRUE = {"1", "true", "yes", "on", "y", "t"}


def _instrument_now() -> None:
    from .autoinstrument import instrument

    instrument()


def activate() -> None:
    """What importing this module does; safe to call any number of times."""
    if os.environ.get("AIM_LLAMA_ENABLED", "").strip().lower() in _FALSE:
        return
    if os.environ.get("AIM_LLAMA_STRICT", "").strip().lower() in _TRUE:
        # Strict mode wants configuration errors at the import line, so validate eagerly.
        from .settings import load_settings

        load_settings()
    when_imported("llama_index.core", _instrument_now)


activate()
