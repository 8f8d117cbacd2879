"""What fabdeploy last saw of each host, kept on this machine: a hint, never the truth.

A rollback planned from the last facts can go out with the lock in one
request; the agent checks them (ops.Guard) before anything changes, and if
the host moved on meanwhile the rollback is planned again from what it
really is. Nothing secret is kept: releases, binds, the lock's holder.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .build import cache_dir


def path_for(host: str, app: str, root: str) -> Path:
    key = hashlib.sha256(f"{host}\0{app}\0{root}".encode()).hexdigest()[:32]
    return cache_dir().parent / "hosts" / f"{key}.json"


def load(host: str, app: str, root: str) -> dict | None:
    try:
        return json.loads(path_for(host, app, root).read_text())
    except (OSError, ValueError):
        return None


def save(host: str, app: str, root: str, facts: dict) -> None:
    """The host's facts as the agent last reported them, written aside and renamed: never half a file."""
    path = path_for(host, app, root)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(facts))
        tmp.replace(path)
    except OSError:
        pass  # only a hint: without it the next rollback takes a round trip more


# What a plan made from remembered facts relies on: the guard compares these.
GUARDED = ("current", "live_target", "releases", "registration", "systemd")


def expectation(facts: dict) -> dict:
    return {key: facts.get(key) for key in GUARDED}
