"""Run vLLM once (in this process: no engine-core or worker processes) and save what the tests
compare: per request the prompt's token ids, the greedy tokens, their top-2 log-probabilities and
text; per call of the model's encoder, the embeddings it returned for each image or video, and the
pooled frame tokens [frames, T, C] it reduced (vLLM's own 2x2 pooling, before any reduction).

    python tests_vllm/engine_run.py SPEC.json OUT.pt

SPEC: {"model": dir, "hf_overrides": {...}, "dtype": "float32" | "bfloat16", "max_tokens": n,
"limit_mm_per_prompt": {"image": i, "video": v}, "calls": [[request, ...], ...]}. Each call is one
``LLM.generate`` with all its requests (vLLM batches them as it schedules them); a request is
{"prompt": str, "videos": [.npy], "images": [.npy], "mm_processor_kwargs": {...}} (all but the
prompt optional). A call that raises is recorded as {"error": message}, and so is every call after
one that failed inside the engine (its requests stay unfinished: vLLM would wait on them forever).
A separate process per engine, because vLLM keeps process-wide state.
"""

import json
import os
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def record_encoder(model, encoder: list, current_call: list) -> None:
    """Wrap ``model.embed_multimodal`` (and vLLM's pooling inside it) so each encoder call's
    modality, embeddings (2-D, one per item) and pooled frame tokens are appended to ``encoder``."""
    embed, pool = model.embed_multimodal, model.apply_pooling
    pooled: list = []

    def pooling(*args, **kwargs):
        result = pool(*args, **kwargs)
        pooled.append(result.detach().clone())
        return result

    def embedding(**kwargs):
        pooled.clear()
        embeddings = embed(**kwargs)
        encoder.append({"call": current_call[0], "modality": "video" if "pixel_values_videos" in kwargs else "image",
                        "embeddings": [e.detach().reshape(-1, e.shape[-1]).clone() for e in embeddings],
                        "pooled": list(pooled)})
        return embeddings

    model.apply_pooling, model.embed_multimodal = pooling, embedding


def engine_input(request: dict, key: str) -> dict:
    """The request as vLLM's prompt dict: videos as frame arrays, images as PIL images, each item
    with its own id starting with ``key`` (so that no item is taken from vLLM's caches of an
    earlier request: each is encoded where the test puts it)."""
    import numpy as np
    from PIL import Image

    media = {"video": [np.load(path) for path in request.get("videos", [])],
             "image": [Image.fromarray(np.load(path)) for path in request.get("images", [])]}
    data = {kind: items[0] if len(items) == 1 else items for kind, items in media.items() if items}
    uuids = {kind: [f"{key}-{kind}{i}" for i in range(len(items))] for kind, items in media.items() if items}
    prompt = {"prompt": request["prompt"], "multi_modal_data": data, "multi_modal_uuids": uuids}
    if "mm_processor_kwargs" in request:
        prompt["mm_processor_kwargs"] = request["mm_processor_kwargs"]
    return prompt


def result_of(output) -> dict:
    return {"prompt_token_ids": list(output.prompt_token_ids),
            "token_ids": list(output.outputs[0].token_ids),
            "top2_logprobs": [sorted((p.logprob for p in step.values()), reverse=True)[:2]
                              for step in output.outputs[0].logprobs],
            "text": output.outputs[0].text}


def main(spec_path: str, out_path: str) -> None:
    import torch
    from vllm import LLM, SamplingParams

    spec = json.loads(open(spec_path).read())
    llm = LLM(model=spec["model"], dtype=spec["dtype"], enforce_eager=True, max_model_len=4096, seed=0,
              limit_mm_per_prompt=spec["limit_mm_per_prompt"],
              hf_overrides=spec["hf_overrides"], distributed_executor_backend="uni")
    encoder: list = []
    current_call = [0]
    llm.apply_model(lambda model: record_encoder(model, encoder, current_call))
    greedy = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True, logprobs=2)
    calls = []
    for index, requests in enumerate(spec["calls"]):
        current_call[0] = index
        if llm.llm_engine.has_unfinished_requests():  # an earlier call failed inside the engine
            calls.append({"error": "not run: the engine failed in an earlier call"})
            continue
        prompts = [engine_input(request, f"{index}.{n}") for n, request in enumerate(requests)]
        try:
            calls.append([result_of(output) for output in llm.generate(prompts, greedy)])
        except Exception as error:  # recorded for the tests that expect a refusal
            calls.append({"error": f"{type(error).__name__}: {error}"})
    torch.save({"calls": calls, "encoder": encoder}, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
