"""The programs fabdeploy runs on a server, as the text that goes there.

The agent (run by the deploy user) and the helper (installed by provision,
run by root through sudo) are each one file: hostlib.py's shared code, then
their own. Nothing on the server imports from anywhere else.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from importlib import resources


def _text(name: str) -> str:
    return resources.files("fabdeploy").joinpath(name).read_text()


@lru_cache(maxsize=None)
def program(name: str) -> bytes:
    """hostlib.py and then <name>.py, as one stdlib-only file."""
    return (f"# fabdeploy's {name}: hostlib.py, then {name}.py.\n" + _text("hostlib.py")
            + f"\n\n# ---- {name}.py ----\n" + _text(f"{name}.py")).encode()


def digest(name: str) -> str:
    return hashlib.sha256(program(name)).hexdigest()[:16]
