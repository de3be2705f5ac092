"""``import llava`` answered by aim_llava, for code written against LLaVA-NeXT (opt-in).

    from aim_llava.compat import alias_llava
    alias_llava(reduction="aim_default")          # before anything imports llava
    from llava.model.builder import load_pretrained_model

    python -m aim_llava.compat --reduction aim_default lmms_eval --model llava_onevision ...

The alias is an import hook for the names ``llava`` and ``llava.*``, installed by an explicit call
(nothing happens on ``import aim_llava``). It provides ``llava.constants``, ``llava.conversation``
and ``llava.mm_utils`` (aim_llava's modules of the same names), ``llava.model.builder`` (whose
``load_pretrained_model`` applies the alias's ``reduction`` and ``torch_dtype`` unless the caller
gives them) and the packages ``llava`` and ``llava.model`` above them. Any other ``llava.*``
module (training, serving, other model families) fails to import with a message naming what is
provided. Like ``import llava`` from LLaVA-NeXT, it registers the ``llava_qwen`` model type with
transformers' AutoConfig (lmms-eval reads checkpoint configs through it).

It never shadows a real LLaVA: when a package named ``llava`` can be imported, or is imported
already, :func:`alias_llava` refuses unless ``force=True`` (a real one already imported is refused
even then).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import runpy
import sys
import types

from aim_llava.errors import AimLlavaError, one_line, refuse_names

MODULES = {
    "llava.constants": "aim_llava.constants",
    "llava.conversation": "aim_llava.conversation",
    "llava.mm_utils": "aim_llava.mm_utils",
}
PACKAGES = ("llava", "llava.model")
BUILDER = "llava.model.builder"
PROVIDED = (*PACKAGES, *MODULES, BUILDER)
DTYPES = ("auto", "float32", "float16", "bfloat16")
MODEL_CLASSES = (
    "load checkpoints with llava.model.builder.load_pretrained_model (aim_llava's model is not a transformers class)"
)


class AliasError(AimLlavaError):
    """The alias cannot be installed as asked."""


class LlavaAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """The import hook: answers ``llava`` and ``llava.*`` from aim_llava, or refuses by name."""

    def __init__(self, reduction=None, torch_dtype: str | None = None):
        self.reduction = reduction
        self.torch_dtype = torch_dtype

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname != "llava" and not fullname.startswith("llava."):
            return None
        if fullname not in PROVIDED:
            raise ModuleNotFoundError(
                f"{fullname} is a part of LLaVA-NeXT that aim_llava does not provide; its llava alias "
                f"provides {', '.join(PROVIDED)}",
                name=fullname,
            )
        return importlib.machinery.ModuleSpec(fullname, self, is_package=fullname in PACKAGES)

    def create_module(self, spec) -> types.ModuleType:
        if spec.name in MODULES:
            return importlib.import_module(MODULES[spec.name])
        if spec.name == BUILDER:
            return self.builder_module()
        package = types.ModuleType(spec.name, f"aim_llava's stand-in for LLaVA-NeXT's {spec.name} package.")
        package.__getattr__ = refuse_names(spec.name, dict.fromkeys(
            ("LlavaLlamaForCausalLM", "LlavaQwenForCausalLM", "LlavaQwenConfig", "LlavaMistralForCausalLM",
             "LlavaMixtralForCausalLM", "LlavaConfig"), MODEL_CLASSES))
        return package

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run: :meth:`create_module` gave a module that is ready."""

    def builder_module(self) -> types.ModuleType:
        from aim_llava.model import builder

        def load_pretrained_model(model_path, model_base=None, model_name="llava_qwen", **options):
            overwrite_config = dict(options.pop("overwrite_config", None) or {})
            if self.reduction is not None:
                overwrite_config.setdefault("reduction", self.reduction)
            if self.torch_dtype is not None:
                options.setdefault("torch_dtype", self.torch_dtype)
            return builder.load_pretrained_model(model_path, model_base, model_name,
                                                 overwrite_config=overwrite_config, **options)

        load_pretrained_model.__doc__ = (
            "aim_llava.model.builder.load_pretrained_model with the llava alias's defaults: "
            "overwrite_config['reduction'] and torch_dtype, where the caller gives none.\n\n"
            + (builder.load_pretrained_model.__doc__ or "")
        )
        module = types.ModuleType(BUILDER, "aim_llava's stand-in for LLaVA-NeXT's llava.model.builder.")
        module.load_pretrained_model = load_pretrained_model
        return module


def installed_alias() -> LlavaAlias | None:
    return next((finder for finder in sys.meta_path if isinstance(finder, LlavaAlias)), None)


def alias_llava(reduction=None, torch_dtype: str | None = None, force: bool = False) -> None:
    """Make ``import llava`` (and the submodules listed in this module's docstring) answer from
    aim_llava, for code written against LLaVA-NeXT.

    ``reduction`` (a preset name, YAML path or mapping, as ``overwrite_config["reduction"]``) and
    ``torch_dtype`` are used by ``llava.model.builder.load_pretrained_model`` when its caller passes
    none: the way to choose them for callers that cannot pass them, such as lmms-eval's
    ``llava_onevision`` model. Calling again replaces them. Refuses (AliasError) when a package named
    ``llava`` is installed, unless ``force=True``, and when one is already imported.
    """
    if torch_dtype is not None and torch_dtype not in DTYPES:
        raise AliasError(f"unknown torch_dtype {torch_dtype!r}; use {', '.join(DTYPES)}")
    alias = installed_alias()
    if alias is not None:
        alias.reduction, alias.torch_dtype = reduction, torch_dtype
        return
    imported = sys.modules.get("llava")
    if imported is not None:
        raise AliasError(f"a package named llava is imported already (from {getattr(imported, '__file__', None)}): "
                         "aim_llava does not replace it; call alias_llava before anything imports llava")
    spec = importlib.util.find_spec("llava")
    if spec is not None and not force:
        where = spec.origin or ", ".join(spec.submodule_search_locations or [])
        raise AliasError(f"a package named llava is installed ({where}): aim_llava does not shadow it; "
                         "uninstall it, or pass force=True (python -m aim_llava.compat --force ...)")
    register_llava_qwen_config()
    sys.meta_path.insert(0, LlavaAlias(reduction, torch_dtype))


def unalias_llava() -> None:
    """Remove the alias and the ``llava`` modules it made (aim_llava's own modules stay)."""
    alias = installed_alias()
    if alias is None:
        return
    sys.meta_path.remove(alias)
    for name in [name for name in sys.modules if name == "llava" or name.startswith("llava.")]:
        del sys.modules[name]


def register_llava_qwen_config() -> None:
    """What ``import llava`` does in LLaVA-NeXT: AutoConfig reads ``"model_type": "llava_qwen"``."""
    from transformers import AutoConfig, Qwen2Config
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    class LlavaQwenConfig(Qwen2Config):
        model_type = "llava_qwen"

    if "llava_qwen" not in CONFIG_MAPPING:
        AutoConfig.register("llava_qwen", LlavaQwenConfig)


def main(argv: list[str] | None = None) -> int:
    """``python -m aim_llava.compat [--reduction R] [--dtype D] [--force] MODULE [ARGS...]``: run
    ``python -m MODULE ARGS...`` with the llava alias installed."""
    from aim_llava.reduction.config import load_reduction_config

    parser = argparse.ArgumentParser(
        prog="python -m aim_llava.compat",
        description="Run a module (e.g. lmms_eval) with `import llava` answered by aim_llava.",
    )
    parser.add_argument("--reduction", help="preset or YAML path used by load_pretrained_model when its caller gives none")
    parser.add_argument("--dtype", choices=DTYPES, help="torch_dtype used when the caller gives none (default: auto)")
    parser.add_argument("--force", action="store_true", help="install the alias even if a llava package is installed")
    parser.add_argument("module", help="the module to run, as with python -m")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    options = parser.parse_args(argv)
    try:
        if options.reduction is not None:
            load_reduction_config(options.reduction)
        if importlib.util.find_spec(options.module) is None:
            raise AliasError(f"no module named {options.module!r} to run")
        alias_llava(options.reduction, options.dtype, options.force)
    except (ValueError, ImportError) as err:  # AimLlavaError is a ValueError
        print(f"{parser.prog}: error: {one_line(str(err))}", file=sys.stderr)
        return 2
    sys.argv = [options.module, *options.args]
    runpy.run_module(options.module, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    # run the copy imported under its own name, so that the alias it installs is the one
    # aim_llava.compat.installed_alias() finds
    from aim_llava.compat import main as compat_main

    sys.exit(compat_main())
