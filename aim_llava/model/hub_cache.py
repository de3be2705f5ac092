"""Hugging Face model ids found offline, in the local Hugging Face cache.

A model downloaded with ``huggingface-cli download ORG/NAME`` (or by transformers) lives in the
hub cache as ``models--ORG--NAME/snapshots/REVISION/``, with ``refs/main`` naming the revision
of the main branch. The cache is ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, ``$HF_HOME``
defaulting to ``$XDG_CACHE_HOME/huggingface`` or ``~/.cache/huggingface``, as huggingface_hub
has it. Nothing is downloaded: a model that is not there is an error that says where it looked.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from aim_llava.errors import CheckpointError

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_repo_id(text: str) -> bool:
    """Whether ``text`` has the shape of a Hugging Face model id (``org/name``)."""
    return REPO_ID.fullmatch(text) is not None and ".." not in text


def hub_cache_dir() -> Path:
    """The hub cache folder the environment names (read at each call)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return cache_home / "huggingface" / "hub"


def cached_snapshot(repo_id: str) -> Path:
    """The snapshot folder of ``repo_id``'s main revision in the hub cache (the only snapshot when
    the cache has no ``refs/main``, as after downloading one revision by its hash)."""
    repo = hub_cache_dir() / f"models--{repo_id.replace('/', '--')}"
    snapshots = repo / "snapshots"
    main = repo / "refs" / "main"
    if main.is_file():
        snapshot = snapshots / main.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    found = sorted(snapshots.iterdir()) if snapshots.is_dir() else []
    if len(found) == 1 and found[0].is_dir():
        return found[0]
    if len(found) > 1:
        raise CheckpointError(f"{repo_id} has {len(found)} snapshots in {snapshots} and no refs/main: give the "
                              "folder of the one you want")
    raise CheckpointError(
        f"model {repo_id!r} is not a local directory, nor in the Hugging Face cache (looked for {repo}; "
        f"HF_HUB_CACHE or HF_HOME say where the cache is): download it where there is network with "
        f"`huggingface-cli download {repo_id}`, or give a checkpoint directory"
    )
