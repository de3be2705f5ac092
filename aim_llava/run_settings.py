"""The settings a results record is made with, carried by the record and keying its resumption.

Every record of ``aim-llava caption``, ``ask`` and ``eval`` holds ``settings`` (the model's
directory, the dtype it runs in, the reduction by name and content digest, the frame sampling,
the prompt template, the generation options: everything besides the item that changes the reply),
``settings_id`` (a digest of them) and ``version`` (the package's). ``--resume`` skips an item only
when a record of it has the same ``settings_id``: a run with other settings does it again, and the
file then holds both, each saying how it was made.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from aim_llava import __version__

GENERATION_FIELDS = ("max_new_tokens", "do_sample", "temperature", "top_p", "seed")  # cuda_graph changes nothing


def run_settings(model_dir: str, dtype: str, reduction, sampling, generation, template: str,
                 time_aware: bool) -> dict:
    """The settings of a run: ``reduction`` a ReductionConfig, ``sampling`` a SamplingOptions,
    ``generation`` a GenerationOptions (aim_llava.pipeline)."""
    options = dataclasses.asdict(generation)
    return {
        "model": model_dir,
        "dtype": dtype,
        "config": reduction.name,
        "config_sha256": reduction.digest(),
        **dataclasses.asdict(sampling),
        "template": template,
        "time_aware": time_aware,
        **{name: options[name] for name in GENERATION_FIELDS},
    }


def settings_id(settings: dict) -> str:
    """A short digest of ``settings`` (the same settings always give the same id)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def stamped(record: dict, settings: dict) -> dict:
    """``record`` with the run's settings, their id and the package version."""
    return {**record, "settings": settings, "settings_id": settings_id(settings), "version": __version__}


def differences(earlier: dict | None, now: dict) -> str:
    """What differs between the settings of an earlier record and the run's, in a few words."""
    if earlier is None:
        return "made before records carried their settings"
    changed = [f"{name} {earlier.get(name)!r} (now {value!r})" for name, value in now.items()
               if earlier.get(name) != value]
    return ", ".join(changed) or "other settings"
