"""The user's AMX setting ("auto", "on", "off", or $EDGE_AMX): what params and amx both read.

Its own module so that amx.py (the decision, which names the setting in its
messages) and params.py (which validates it and asks amx for a plan) do not
import each other.
"""
from __future__ import annotations

import os

from .errors import LoadOptionError

AMX_ENV = "EDGE_AMX"
_AMX_WORDS = {"auto": "auto", "on": "on", "off": "off", True: "on", False: "off", "1": "on", "0": "off",
              "true": "on", "false": "off", "yes": "on", "no": "off"}


def amx_word(amx: bool | str) -> str:
    """"auto", "on" or "off" for an option value; LoadOptionError names the bad value."""
    key = amx.strip().lower() if isinstance(amx, str) else amx
    if key not in _AMX_WORDS:
        raise LoadOptionError(f"amx must be 'auto', True or False, got {amx!r}")
    return _AMX_WORDS[key]


def resolve_amx(amx: bool | str) -> str:
    """"auto", "on" or "off": an explicit option wins, "auto" defers to $EDGE_AMX (itself auto by default)."""
    choice = amx_word(amx)
    if choice != "auto":
        return choice
    env = os.environ.get(AMX_ENV, "auto").strip().lower()
    if env not in _AMX_WORDS or isinstance(_AMX_WORDS.get(env), bool):
        raise LoadOptionError(f"${AMX_ENV}={os.environ[AMX_ENV]!r}: use auto, on or off")
    return _AMX_WORDS[env]
