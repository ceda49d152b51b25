"""Reading on/off settings from the environment, with one rule for every layer."""

from __future__ import annotations

import os

#: Texts that turn a flag off; anything else turns it on.
OFF = ("", "0", "false")


def env_flag(name: str, default: bool = False) -> bool:
    """Whether the environment variable ``name`` is on: set to anything but
    empty, ``0`` or ``false``; ``default`` when it is not set at all."""
    value = os.environ.get(name)
    return default if value is None else value not in OFF
