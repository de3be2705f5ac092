"""Work for ``cuda:N`` goes to GPU N: loading and each torchrun rank make their GPU current, the
model's entry points run under it, and streams, events and graph captures name their device
(asserted through stand-ins for ``torch.cuda``; the GPU tier runs the real thing)."""

import importlib.util
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import prompt_ids, random_frames
from fake_cuda import FakeCuda, ToyStep

from aim_llava import devices
from aim_llava.distributed import Shard
from aim_llava.model import builder
from aim_llava.model.language_model.generation import MIN_GRAPHED_TOKENS, GraphedStep, HostMirror, step_runner
from aim_llava.timing import StageTimes, stage

GPU1 = torch.device("cuda:1")


def test_loading_makes_the_models_gpu_current_before_building_it(tiny_qwen_dir, monkeypatch):
    calls = []
    real_build = builder.build_model
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", torch.device(device))))

    def build_on_cpu(model_dir, config, device, *args):
        calls.append(("build", device))
        return real_build(model_dir, config, torch.device("cpu"), *args)

    monkeypatch.setattr(builder, "build_model", build_on_cpu)
    builder.load_pretrained_model(tiny_qwen_dir, device_map="cuda:1", torch_dtype="float32")
    assert calls == [("set_device", GPU1), ("build", GPU1)]


def test_each_rank_uses_its_local_gpu_made_current_and_the_groups_device(monkeypatch):
    calls = []
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", torch.device(device))))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: calls.append((backend, kwargs)))
    for asked in ("auto", "cuda"):
        calls.clear()
        assert Shard(rank=1, world=2).start(asked) == "cuda:1"
        assert calls == [("set_device", GPU1), ("nccl", {"device_id": GPU1})]


def test_a_cpu_run_under_torchrun_joins_with_gloo(monkeypatch):
    joined = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: joined.append((backend, kwargs)))
    assert Shard(rank=1, world=2).start("auto") == "auto" and joined == [("gloo", {})]


def test_on_device_enters_the_gpus_context_and_nothing_elsewhere(monkeypatch):
    entered = []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    with devices.on_device("cuda:1"), devices.on_device("cpu"):
        pass
    assert entered == [GPU1]


def test_generate_and_prefill_run_under_the_models_device(loaded, monkeypatch):
    """The prefill (where Triton kernels launch) and every decoding step run inside the model's
    device context, also when called from another thread than the loader's."""
    tokenizer, model, processor, _ = loaded
    inside, seen = [], []

    class Bound:
        def __init__(self, device):
            seen.append(torch.device(device))

        def __enter__(self):
            inside.append(True)

        def __exit__(self, *exc):
            inside.pop()

    def watched(function):
        def call(*args, **kwargs):
            assert inside, f"{function.__name__} ran outside the model's device context"
            return function(*args, **kwargs)
        return call

    monkeypatch.setattr(devices, "on_device", Bound)
    monkeypatch.setattr(model.model, "decode", watched(model.model.decode))
    monkeypatch.setattr(model.model, "step", watched(model.model.step))
    video = processor.preprocess(random_frames(2, 48, 64))["pixel_values"]
    ids = prompt_ids(tokenizer, "Describe.")
    model.generate(ids, images=[video], modalities=["video"], max_new_tokens=3, eos_token_id=[])
    model(ids, images=[video], modalities=["video"])  # a prefill of its own
    assert len(seen) >= 2 and set(seen) == {model.device} and not inside


def test_graph_capture_uses_streams_of_the_steps_device(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    step = GraphedStep(ToyStep(), GPU1, strict=True, eager_steps=1)
    for number in range(4):
        step(torch.full((3,), float(number)), torch.tensor([number]))
    assert step.graph is not None
    assert cuda.streams == [GPU1] and cuda.current_streams and set(cuda.current_streams) == {GPU1}


def test_host_mirror_records_its_events_on_the_devices_stream(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    mirror = HostMirror(batch=2, steps=3, device=GPU1)
    for step in range(3):
        mirror.push(step, torch.tensor([step, step + 1]), torch.tensor(step == 2))
    assert mirror.deliver(2) == 2 and mirror.tokens.tolist() == [[0, 1], [1, 2], [2, 3]]
    assert cuda.events == [GPU1] * 3
    assert cuda.pinned_bytes == [mirror.tokens.nbytes, mirror.finished.nbytes, mirror.broken.nbytes]


def test_stage_events_are_recorded_on_the_named_devices_stream(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    with StageTimes() as times:
        with stage("prefill", "cuda:1"):
            pass
    assert cuda.events == [GPU1, GPU1] and times.seconds() == {"prefill": 0.002}


def test_long_generations_on_a_gpu_get_a_graphed_step_for_that_gpu():
    assert step_runner(len, torch.device("cpu"), True, 100) is len
    assert step_runner(len, GPU1, True, MIN_GRAPHED_TOKENS) is len
    assert step_runner(len, GPU1, False, 100) is len
    graphed, strict = step_runner(len, GPU1, True, 100), step_runner(len, GPU1, "strict", 100)
    assert graphed.device == strict.device == GPU1 and not graphed.strict and strict.strict


def script(name: str):
    """A module of scripts/ loaded by path."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decode_attention_bench_captures_and_times_on_the_asked_devices_streams(monkeypatch):
    """scripts/bench_decode_attention.py with ``--device cuda:1``: the whole run has cuda:1 as the
    current device, the graph is captured on a side stream of cuda:1 (torch.cuda.graph's own
    stream belongs to the current device: with cuda:0 current it captured nothing) and the timing
    events are recorded on cuda:1's stream; the captured graph holds the attention's operators and
    is replayed once per repeat."""
    bench = script("bench_decode_attention")
    cuda = FakeCuda(monkeypatch)
    q, k, v, mask = bench.step_inputs(1, 24, 4, 2, 16, torch.float32, "cpu")
    seconds = bench.seconds_per_call(bench.variant("eager", q, k, v, mask, 0.25), GPU1, repeats=5)
    (graph,) = cuda.graphs
    assert cuda.streams == [GPU1] and graph.stream is not None and graph.stream.device == GPU1
    assert len(graph.operations) > 0 and graph.replays == 5
    assert cuda.events == [GPU1, GPU1] and seconds == 2.0 / 1000 / 5
    entered = []
    monkeypatch.setattr(bench, "measure", lambda args: entered.extend(cuda.devices_entered) or [])
    monkeypatch.setattr(sys, "argv", ["bench_decode_attention.py", "--device", "cuda:1"])
    bench.main()
    assert entered == [GPU1]


def test_importance_bench_runs_its_kernels_under_the_asked_device(monkeypatch):
    """scripts/bench_importance.py launches Triton kernels, which go to the current device's
    stream: with ``--device cuda:1`` everything it measures runs with cuda:1 current."""
    bench = script("bench_importance")
    cuda = FakeCuda(monkeypatch)
    entered = []
    monkeypatch.setattr(bench, "measure", lambda args: entered.extend(cuda.devices_entered))
    monkeypatch.setattr(sys, "argv", ["bench_importance.py", "--device", "cuda:1"])
    bench.main()
    assert entered == [GPU1]
