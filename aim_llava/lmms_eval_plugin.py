"""lmms-eval model ``aim_llava``, registered through lmms-eval's entry-point group
``lmms_eval.models`` by :mod:`aim_llava.lmms_eval_manifest` (no fork of lmms-eval; install with
``pip install '.[eval]'``).

    python -m lmms_eval --model aim_llava \\
        --model_args pretrained=model/llava-onevision-qwen2-7b-ov,config=aim_default,max_frames_num=32 \\
        --tasks videomme --batch_size 8

Model arguments: ``pretrained`` (a local checkpoint directory), ``config`` (preset, YAML path,
``fitprune:R.json`` or ``budget:X``), ``max_frames_num``, ``conv_template``,
``attn_implementation``, ``device``, ``dtype``, ``max_new_tokens``, ``workers`` (threads reading
ahead); lmms-eval's ``--batch_size`` sets how many requests are generated together. Videos (paths)
and single images are supported; log-likelihood requests are not.
"""

from __future__ import annotations

import logging
from itertools import groupby

import numpy as np
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from aim_llava.errors import InputError
from aim_llava.pipeline import GenerationOptions, Request, SamplingOptions, VideoLLM
from aim_llava.records import error_message
from aim_llava.video import VideoClip

logger = logging.getLogger(__name__)


def image_clip(image: Image.Image) -> VideoClip:
    return VideoClip(np.asarray(image.convert("RGB"))[None], [0], [0.0], 0.0, 0.0, "image", is_image=True)


class AimLlava(lmms):
    def __init__(
        self,
        pretrained: str,
        config: str = "baseline",
        max_frames_num: int = 32,
        conv_template: str = "qwen_1_5",
        attn_implementation: str = "sdpa",
        device: str = "auto",
        dtype: str = "auto",
        max_new_tokens: int = 128,
        batch_size: int = 1,
        workers: int = 2,
        **unused,
    ) -> None:
        super().__init__()
        self.batch_size_per_gpu = int(batch_size)
        self.workers = int(workers)
        if self.batch_size_per_gpu < 1 or self.workers < 0:
            raise InputError("aim_llava needs batch_size >= 1 and workers >= 0")
        self.llm = VideoLLM.from_pretrained(
            pretrained, config, device=device, dtype=dtype, attn_implementation=attn_implementation,
            conv_template=conv_template, sampling=SamplingOptions(num_frames=int(max_frames_num)),
            generation=GenerationOptions(max_new_tokens=int(max_new_tokens)),
        )

    def request(self, instance: Instance) -> Request:
        context, _, doc_to_visual, doc_id, task, split = instance.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        if not visuals:
            raise InputError("aim_llava needs a video or an image for every request")
        if len(visuals) > 1:
            raise InputError("aim_llava takes one video or one image per request")
        visual = visuals[0]
        return Request(image_clip(visual) if isinstance(visual, Image.Image) else visual, [(context, None)])

    def generation_options(self, gen_kwargs: dict) -> dict:
        options = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens", self.llm.generation.max_new_tokens))}
        temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
        if gen_kwargs.get("do_sample") and temperature > 0:
            options.update(do_sample=True, temperature=temperature, top_p=gen_kwargs.get("top_p"))
        return options

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Requests with the same generation settings run together, ``batch_size`` at a time, while
        worker threads read the next videos. A request that fails is logged and answered with an
        empty string (lmms-eval scores it as wrong) so the run goes on."""
        answers: list[str] = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="aim_llava")
        for options, group in groupby(requests, key=lambda r: tuple(sorted(self.generation_options(r.args[1]).items()))):
            group = list(group)
            for instance, result in zip(group, self.llm.run([self.request(r) for r in group], self.batch_size_per_gpu,
                                                            self.workers, **dict(options))):
                if result.error is not None:
                    logger.error("aim_llava: request %s of %s failed: %s", instance.args[3], instance.args[4],
                                 error_message(result.error))
                text = result.response.text if result.error is None else ""
                answers.append(text)
                self.cache_hook.add_partial("generate_until", (instance.args[0], instance.args[1]), text)
                progress.update(1)
        progress.close()
        return answers

    def loglikelihood(self, requests):
        raise NotImplementedError("aim_llava does not score log-likelihoods: use generate_until tasks")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("aim_llava does not run multi-round lmms-eval tasks")
