"""The Qwen2.5-VL family: a windowed vision transformer with a 2x2 patch merger in front of our
Qwen2 decoder with multimodal RoPE (3B, 7B, 32B, 72B; ``Qwen/Qwen2.5-VL-*-Instruct``).

``config`` reads its config.json, ``vision`` is the tower, ``processor`` turns frames and images
into patches at their native resolution, ``positions`` gives the tokens their (time, height,
width) positions, ``modeling`` assembles the model and ``family`` is its entry point for the rest
of the package (:mod:`aim_llava.model.families`).
"""
