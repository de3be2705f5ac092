"""The entry point lmms-eval loads (group ``lmms_eval.models``) to find the model ``aim_llava``.

lmms-eval loads every plugin's entry point when it builds its model list, so this module imports
nothing heavy: the model class (:mod:`aim_llava.lmms_eval_plugin`) is imported only when a run
asks for ``--model aim_llava``.
"""

from __future__ import annotations

MODEL_CLASS_PATH = "aim_llava.lmms_eval_plugin.AimLlava"


def manifest():
    """lmms-eval's ``ModelManifest`` for ``aim_llava`` (lmms-eval is already imported when it
    calls this)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="aim_llava", simple_class_path=MODEL_CLASS_PATH)
