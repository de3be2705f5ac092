"""A local multiple-choice video QA runner (``aim-llava eval``), resumable and shardable.

Data: JSONL, one item per line: ``{"id": ..., "video": PATH, "question": TEXT, "options": [TEXT,
...], "answer": "B", "category": TEXT}`` (``id`` defaults to the line number, ``category`` to
"all"; ``answer`` may be a letter or the option's text). The prompt is the LLaVA-OneVision
evaluation's multiple-choice format: the question, the options as "A. ...", then "Answer with the
option's letter from the given choices directly." The first option letter in the reply is the
prediction.

Every item's record is appended to ``OUTPUT_DIR/CONFIG.jsonl`` as soon as it is done (see
:class:`~aim_llava.records.ResultsFile`), stamped with the run's settings
(:mod:`aim_llava.run_settings`); resuming skips items already recorded without error with the same
settings. A config given as a YAML file writes ``STEM-DIGEST.jsonl``, its content's digest in the
name, so that two files of one name (``exp1/config.yaml``, ``exp2/config.yaml``) never share
records. Under a launcher that sets RANK and WORLD_SIZE (torchrun, ``accelerate launch``), each
process takes every WORLD_SIZE-th item, writes ``CONFIG.rankR.jsonl``, and rank 0 merges them in
data order.
"""

from __future__ import annotations

import re
import statistics
import string
from dataclasses import dataclass
from pathlib import Path

from aim_llava.distributed import Shard
from aim_llava.errors import AimLlavaError
from aim_llava.flops import record_cost
from aim_llava.pipeline import Request
from aim_llava.records import (
    error_message,
    latest_by_key,
    read_records,
    write_records,
)
from aim_llava.run_settings import settings_id, stamped
from aim_llava.text_files import parse_json, read_text_file

POST_PROMPT = "Answer with the option's letter from the given choices directly."


class EvalDataError(AimLlavaError):
    """A data file the runner cannot use."""


@dataclass
class Item:
    id: str
    video: str
    question: str
    options: list[str]
    answer: str
    category: str

    def prompt(self) -> str:
        lines = [f"{letter}. {text}" for letter, text in zip(string.ascii_uppercase, self.options)]
        return "\n".join([self.question, *lines, POST_PROMPT])

    def key(self, settings: dict) -> tuple:
        """The :func:`item_key` of this item's records made with ``settings``."""
        return self.id, self.video, self.question, tuple(self.options), settings_id(settings)


def read_items(path: Path) -> list[Item]:
    items, seen = [], set()
    for number, line in enumerate(read_text_file(path, "evaluation data").splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = parse_json(line)
            options = [str(o) for o in raw["options"]]
            answer = str(raw["answer"]).strip()
            video, question = str(raw["video"]), str(raw["question"])
        except (ValueError, KeyError, TypeError):
            raise EvalDataError(f'{path} line {number}: needs JSON with "video", "question", "options", "answer"') from None
        if not 2 <= len(options) <= 26:
            raise EvalDataError(f"{path} line {number}: give between 2 and 26 options")
        letters = string.ascii_uppercase[: len(options)]
        if answer not in letters:
            if answer not in options:
                raise EvalDataError(f"{path} line {number}: answer {answer!r} is neither a letter nor an option")
            answer = letters[options.index(answer)]
        item_id = str(raw.get("id", number))
        if item_id in seen:
            raise EvalDataError(f"{path} line {number}: duplicate id {item_id!r}")
        seen.add(item_id)
        items.append(Item(item_id, video, question, options, answer, str(raw.get("category", "all"))))
    if not items:
        raise EvalDataError(f"{path} holds no items")
    return items


def parse_choice(text: str, count: int) -> str | None:
    """The first option letter in a reply ("B", "B.", "(B) ...", "The answer is B")."""
    letters = string.ascii_uppercase[:count]
    match = re.search(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", text.strip())
    return match.group(1) if match else None


def item_record(item: Item, settings: dict, result, arch) -> dict:
    """The record of one answered (or failed) item made with ``settings``; ``result`` is a
    pipeline Result of a model of config ``arch``."""
    record = {"id": item.id, "video": item.video, "question": item.question, "options": item.options,
              "category": item.category, "answer": item.answer, "config": settings["config"], "prediction": None,
              "correct": False, "text": None, "error": None}
    if result.error is not None:
        record["error"] = error_message(result.error)
        return stamped(record, settings)
    response = result.response
    prediction = parse_choice(response.text, len(item.options))
    record.update(
        text=response.text, prediction=prediction, correct=prediction == item.answer,
        frames=len(result.visual.clip.indices), visual_tokens=response.reduction.visual_tokens_per_layer[0][0],
        **record_cost(arch, result),
        prefill_s=round(response.first_token_s, 4), visual_cached=result.visual.cached,
    )
    return stamped(record, settings)


def summarize(records: list[dict]) -> dict:
    """Accuracy overall and per category (errors count as wrong), mean visual tokens and prefill."""
    done = [r for r in records if r["error"] is None]
    categories: dict[str, list[bool]] = {}
    for r in records:
        categories.setdefault(r["category"], []).append(bool(r["correct"]))
    return {
        "items": len(records),
        "errors": len(records) - len(done),
        "accuracy": sum(bool(r["correct"]) for r in records) / len(records) if records else 0.0,
        "per_category": {c: sum(v) / len(v) for c, v in sorted(categories.items())},
        "mean_visual_tokens": statistics.mean(r["visual_tokens"] for r in done) if done else 0.0,
        "mean_prefill_s": statistics.mean(r["prefill_s"] for r in done) if done else 0.0,
    }


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "config"


def item_key(record: dict) -> tuple:
    """What resuming compares: the item (id, video, question, options) and the settings' id."""
    return (record["id"], record.get("video"), record.get("question"), tuple(record.get("options") or ()),
            record.get("settings_id"))


def results_stem(spec: str, reduction) -> str:
    """The name of a config's results file without its suffix: the config's name, and for a
    YAML file also its content's digest (two ``config.yaml`` of a sweep never share a file)."""
    stem = safe_name(reduction.name)
    return f"{stem}-{reduction.digest()[:8]}" if Path(spec).suffix in (".yaml", ".yml") else stem


def records_path(out_dir: Path, stem: str, shard: Shard) -> Path:
    """Where this process writes a config's records (``stem``: :func:`results_stem`)."""
    suffix = ".jsonl" if shard.world == 1 else f".rank{shard.rank}.jsonl"
    return out_dir / f"{stem}{suffix}"


def todo_items(items: list[Item], shard: Shard, results, settings: dict) -> list[Item]:
    """This process's share of ``items`` not yet done with ``settings`` in ``results``."""
    done = results.done()
    return [item for item in shard.take(items) if item.key(settings) not in done]


def run_config(llm, items: list[Item], shard: Shard, results, reduction, settings: dict, progress=None, report=None,
               batch_size: int = 1, workers: int = 2) -> list[dict]:
    """Evaluate this process's share of ``items`` with one reduction config, ``batch_size`` items
    generated together while ``workers`` threads read the next videos, appending each record
    (stamped with ``settings``, :func:`aim_llava.run_settings.run_settings`) to ``results`` (a
    :class:`~aim_llava.records.ResultsFile`); items already done there with these settings are
    skipped. ``report(record, error)`` is told of every failed item and the exception it failed
    with. Returns this share's records."""
    todo = todo_items(items, shard, results, settings)
    requests = [Request(item.video, [(item.prompt(), None)]) for item in todo]
    for item, result in zip(todo, llm.run(requests, batch_size, workers, reduction=reduction)):
        record = item_record(item, settings, result, llm.model.config)
        results.append(record)
        if record["error"] is not None and report is not None:
            report(record, result.error)
        if progress is not None:
            progress.update(1)
    return ordered_records(items, results.records, settings)


def merge_shards(items: list[Item], out_dir: Path, stem: str, world: int, settings: dict,
                 resume: bool = False) -> list[dict]:
    """Rank 0: all shards' records written to ``STEM.jsonl`` (after the records it held, when
    resuming), this run's in data order; returns this run's."""
    merged = out_dir / f"{stem}.jsonl"
    records = read_records(merged, item_key) if resume else []
    for rank in range(world):
        records += read_records(out_dir / f"{stem}.rank{rank}.jsonl", item_key)
    latest = latest_by_key(records, item_key)
    current = ordered_records(items, latest, settings)
    chosen = {id(record) for record in current}
    others = [record for record in latest if id(record) not in chosen]
    write_records(merged, others + current)
    return current


def ordered_records(items: list[Item], records: list[dict], settings: dict) -> list[dict]:
    """The latest record of every item made with ``settings``, in data order."""
    latest = {item_key(r): r for r in latest_by_key(records, item_key)}
    return [latest[item.key(settings)] for item in items if item.key(settings) in latest]


def cache_cell(counts: dict | None) -> str:
    """The reuse cache's hits and misses of one config ("off" without the cache)."""
    if counts is None:
        return "off"
    return " / ".join(f"{counts[kind + '_hits']}:{counts[kind + '_misses']}" for kind in ("visual", "prefix"))


def comparison_table(rows: list[dict]) -> str:
    lines = ["| config | items | accuracy | errors | mean visual tokens | prefill TFLOPs | mean prefill s | "
             "cache hits:misses visual / prefix |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['config']} | {row['items']} | {100 * row['accuracy']:.1f}% | {row['errors']} | "
                     f"{row['mean_visual_tokens']:.0f} | {row['prefill_tflops']:.3f} | {row['mean_prefill_s']:.3f} | "
                     f"{cache_cell(row.get('cache'))} |")
        for category, accuracy in row["per_category"].items():
            lines.append(f"| &nbsp;&nbsp;{category} | | {100 * accuracy:.1f}% | | | | | |")
    return "\n".join(lines)


def plot_accuracy_vs_flops(rows: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AimLlavaError("--plot needs matplotlib: pip install '.[plot]'") from None
    fig, axis = plt.subplots(figsize=(6, 4.5))
    for row in rows:
        axis.scatter(row["prefill_tflops"], 100 * row["accuracy"])
        axis.annotate(row["config"], (row["prefill_tflops"], 100 * row["accuracy"]), fontsize=8)
    axis.set_xlabel("prefill TFLOPs (paper accounting)")
    axis.set_ylabel("accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
