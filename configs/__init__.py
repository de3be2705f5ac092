"""Reduction presets (one YAML file each), installed as the package ``aim_llava.configs``."""
