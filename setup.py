from setuptools import find_packages, setup

setup(
    name="aim-llava",
    version="0.1.0",
    description="Fast video/image LLM inference (LLaVA-OneVision) with training-free visual-token reduction",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["aim_llava", "aim_llava.*"]),
    package_data={"aim_llava": ["configs/*.yaml"]},
    install_requires=[
        "torch>=2.5",
        "torchvision",
        "transformers>=5,<6",
        "tokenizers",
        "safetensors",
        "accelerate",
        "sentencepiece",
        "numpy",
        "pillow",
        "pyyaml",
        "av",
        "qwen-vl-utils",
        # decord has wheels for x86_64 only; the package works without it.
        "decord; platform_machine == 'x86_64' or platform_machine == 'AMD64'",
    ],
    extras_require={
        "flash": ["flash-attn>=2.1"],
        "plot": ["matplotlib"],
        "eval": ["lmms-eval>=0.7"],
        "dev": ["pytest>=7", "pytest-timeout", "matplotlib", "lmms-eval>=0.7"],
    },
    entry_points={
        "console_scripts": ["aim-llava = aim_llava.cli:main"],
        "lmms_eval.models": ["aim_llava = aim_llava.lmms_eval_plugin:manifest"],
    },
)
