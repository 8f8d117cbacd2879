"""The instance config.py that holds SECRET_KEY: first written, then rotated."""
from __future__ import annotations

import ast
import secrets

HEADER = "# Written by fabdeploy on the first deploy; kept across deploys and rollbacks.\n"
KEEP_FALLBACKS = 3  # older keys still accepted after rotations


def new_key() -> str:
    """One key per invocation, so every host of a fleet signs sessions alike."""
    return secrets.token_hex()


def new_config(key: str) -> str:
    return f"{HEADER}SECRET_KEY = {key!r}\n"


def rotate(text: str, key: str) -> str:
    """A new SECRET_KEY; the old one joins SECRET_KEY_FALLBACKS (Flask >= 3.1).

    Any other lines of the file are kept as they are.
    """
    tree = ast.parse(text)
    values: dict[str, object] = {}
    drop: set[int] = set()
    for node in tree.body:
        names = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        for name in names:
            if name in ("SECRET_KEY", "SECRET_KEY_FALLBACKS"):
                values[name] = ast.literal_eval(node.value)
                drop.update(range(node.lineno, node.end_lineno + 1))
    if "SECRET_KEY" not in values:
        raise ValueError("config.py has no SECRET_KEY to rotate")
    fallbacks = [values["SECRET_KEY"], *values.get("SECRET_KEY_FALLBACKS", [])][:KEEP_FALLBACKS]
    kept = [line for n, line in enumerate(text.splitlines(keepends=True), 1) if n not in drop]
    body = "".join(kept)
    if body and not body.endswith("\n"):
        body += "\n"
    return (f"{body}SECRET_KEY = {key!r}\n"
            f"SECRET_KEY_FALLBACKS = {fallbacks!r}\n")
