"""Keys of encoded visuals: everything that decides the visual tokens of a request.

A key is ``("visual", source, preprocessing, dtype, device, pre-LLM reduction)``:

* source: for a file or frame directory, its identity (resolved path, size, mtime_ns, inode and
  device; for a directory, those of every entry) and the sampling arguments, so that a changed file
  is a miss and the frames need not be decoded to know it; for frames already in memory (a
  :class:`VideoClip`, an image sent inline to the server), a BLAKE2 digest of the pixels and their
  times;
* the preprocessing (processor size, mean and std; the model's anyres and pooling settings);
* the model's dtype and device;
* the reduction plan's :meth:`~aim_llava.reduction.plan.ReductionPlan.visual_key` (its merging and
  vision-tower reduction, not its pruning inside the LLM).

A cache belongs to one loaded model (its weights are not in the key).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aim_llava.video import VideoClip, directory_names


def file_identity(path: str | Path, max_entries: int | None = None) -> tuple:
    """(resolved path, size, mtime_ns, inode, device) of a file; for a directory, also those of
    its entries (a frame directory changes when one of its frames does), counted first: one of
    more than ``max_entries`` is a VideoError before any entry is read. The status is that of what
    ``path`` reaches (for the server's ``/proc/self/fd/N``, the file it holds open), the resolved
    path only a label."""
    resolved = Path(path).resolve()
    status = os.stat(path)
    identity = (str(resolved), status.st_size, status.st_mtime_ns, status.st_ino, status.st_dev)
    if not stat.S_ISDIR(status.st_mode):
        return identity
    entries = []
    for name in sorted(directory_names(path, max_entries)):
        inner = os.stat(os.path.join(path, name))
        entries.append((name, inner.st_size, inner.st_mtime_ns, inner.st_ino))
    return identity + (tuple(entries),)


def clip_digest(clip: VideoClip) -> str:
    """A digest of a clip's pixels, shape, frame indices and times (its sampling rate among them:
    Qwen2.5-VL's time positions depend on it)."""
    digest = hashlib.blake2b(digest_size=20)
    frames = np.ascontiguousarray(clip.frames)
    digest.update(repr((frames.shape, str(frames.dtype), clip.indices, clip.timestamps, clip.duration, clip.fps,
                        clip.is_image, clip.sampled_fps)).encode())
    digest.update(memoryview(frames).cast("B"))
    return digest.hexdigest()


@dataclass
class KeyedClip(VideoClip):
    """Frames read from a file, with the file's identity and sampling (its source key)."""

    source_key: tuple = ()


def source_key(source: str | Path | VideoClip, sampling: Hashable = None, max_entries: int | None = None) -> tuple:
    """What identifies the frames of ``source``: a file's identity (a directory of at most
    ``max_entries`` entries) with the ``sampling`` that reads it, or an in-memory clip's digest."""
    if isinstance(source, KeyedClip):
        return source.source_key
    if isinstance(source, VideoClip):
        return ("frames", clip_digest(source))
    return ("file", file_identity(source, max_entries), sampling)


def clip_fields(clip: VideoClip) -> dict:
    """The fields of ``clip`` that a :class:`VideoClip` has (a :class:`KeyedClip`'s key left out)."""
    return {f.name: getattr(clip, f.name) for f in dataclasses.fields(VideoClip)}


def keyed(clip: VideoClip, key: tuple) -> KeyedClip:
    return KeyedClip(**clip_fields(clip), source_key=key)


def without_pixels(clip: VideoClip) -> VideoClip:
    """The clip's times and indices without its pixels (what an encoded visual keeps in the cache)."""
    frames = np.empty((0, *clip.frames.shape[1:]), dtype=clip.frames.dtype)
    return VideoClip(**{**clip_fields(clip), "frames": frames})


def visual_key(source: tuple, preprocessing: Hashable, dtype, device, pre_llm: Hashable) -> tuple:
    """The cache key of an encoded visual."""
    return "visual", source, preprocessing, str(dtype), str(device), pre_llm
