"""Run vLLM once (in this process: no engine-core or worker processes) and save what the tests
compare: per request the prompt's token ids, the greedy tokens, their top-2 log-probabilities and text,
and the multimodal embeddings the model built for it.

    python tests_vllm/engine_run.py SPEC.json OUT.pt

SPEC: {"model": dir, "hf_overrides": {...}, "videos": [.npy paths], "prompts": [...],
"max_tokens": n}. A separate process per engine, because vLLM keeps process-wide state.
"""

import json
import os
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def record_embeddings(model, calls: list) -> None:
    """Wrap ``model.embed_multimodal`` so each call's embeddings are appended to ``calls``."""
    inner = model.embed_multimodal

    def recording(**kwargs):
        embeddings = inner(**kwargs)
        calls.append([e.detach().clone() for e in embeddings])
        return embeddings

    model.embed_multimodal = recording


def main(spec_path: str, out_path: str) -> None:
    import numpy as np
    import torch
    from vllm import LLM, SamplingParams

    spec = json.loads(open(spec_path).read())
    llm = LLM(model=spec["model"], dtype="float32", enforce_eager=True, max_model_len=4096, seed=0,
              limit_mm_per_prompt={"image": 0, "video": 1}, hf_overrides=spec["hf_overrides"],
              distributed_executor_backend="uni")
    calls: list = []
    llm.apply_model(lambda model: record_embeddings(model, calls))
    greedy = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True, logprobs=2)
    results = []
    for video, prompt in zip(spec["videos"], spec["prompts"]):
        first = len(calls)
        output = llm.generate({"prompt": prompt, "multi_modal_data": {"video": np.load(video)}}, greedy)[0]
        embeddings = [e for call in calls[first:] for e in call]
        results.append({"prompt_token_ids": list(output.prompt_token_ids),
                        "token_ids": list(output.outputs[0].token_ids),
                        "top2_logprobs": [sorted((p.logprob for p in step.values()), reverse=True)[:2]
                                          for step in output.outputs[0].logprobs],
                        "text": output.outputs[0].text, "embeddings": embeddings})
    torch.save(results, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
