"""The vendored LLaVA-OneVision model (SigLIP + MLP projector + Qwen2); load it with
:func:`aim_llava.model.builder.load_pretrained_model`."""
