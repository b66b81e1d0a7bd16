"""Cost of ADEM-VL's fusion next to the bare LLM and LLaVA-style input fusion, measured side by side, with spreads.

  python -m benchmarks.fusion_speed [--shape smollm2|llama7b|tiny] [--dtypes float32,bfloat16] [--threads 2]
      [--repeats 7 --max-repeats 20 --target-spread 0.02] [--variants llm,none,adem,prefix]
      [--compare REV [--python PYTHON]] [--out benchmarks/results]

Variants share one frozen LLM (random weights of the shape): `llm` (no fusion at all: forward, and backward to the
input embeddings; the physical limit), `none` (ADEM-VL's learned memory without vision), `adem`, and `prefix`
(every CLIP token projected and prepended, 257 at ViT-L/14 shape). Each is timed on a training step (forward +
backward to the trainable parameters) and on greedy generation of 32 tokens with the KV cache, once per arithmetic
path (--dtypes: float32, or the frozen towers in bfloat16 under autocast). After a warm-up, every repeat times each
step once, in an order rotated from repeat to repeat; each ratio is computed within a repeat and reported with its
median, quartiles, range and the 95% confidence interval of the median (benchmarks/spread.py). Repeats are added,
up to --max-repeats, until every ratio's interval is within +-target (the output says when it is not). Threads are
pinned (--threads). With --compare REV, this checkout's model code and REV's each run in their own process, timed
alternately, so a ratio between the two commits comes with its spread too (benchmarks/trees.py).
Memory is the bytes autograd saves for backward in one training step (CPU) or the step's peak allocation above the
resident weights (CUDA); it, the aten operations each step dispatches (forward and backward, counted below autograd)
and the analytic FLOPs are deterministic: on a machine whose timings scatter by more than a change costs, the
operation count of --compare still shows whether the change adds work. Each sample holds `text_tokens` tokens of
text (prompt and answer; `adem` adds its "Image: " prefix and [cls] slot) under a BPE tokenizer trained on that
text, so words and the prefix take as many tokens as under SmolLM2's. The JSON records the machine (CPU kind and its
bfloat16 support, threads, versions, git revision). Writes JSON and a markdown table; nothing is asserted.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import lavis_ademvl
from benchmarks.machine import arithmetic_path, cpu_kind, describe, git_revision, machine
from benchmarks.spread import per_repeat_ratio, spread, within
from benchmarks.trees import CHECKOUT, WorkerSession, copy_driver, export_revision
from lavis_ademvl.models.ademvl import AdemVL, answer_loss
from lavis_ademvl.models.config import AdemVLConfig
from lavis_ademvl.models.processing import EncodedBatch


@dataclass
class Shape:
    name: str
    llm: dict
    vision: dict
    batch: int
    text_tokens: int
    down_sample_num: list
    dtype: torch.dtype


SHAPES = {
    # SmolLM2-135M: d 576, 30 layers, 9 heads / 3 KV heads; a small 16 x 16-patch tower gives Nv = 256 + 64.
    "smollm2": Shape("smollm2", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                     num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0),
                     dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=4,
                          image_size=64, patch_size=4), 4, 128, [256, 64], torch.float32),
    # LLaMA-7B + ViT-L/14 at 224 px, bf16 (GPU).
    "llama7b": Shape("llama7b", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                                     vocab_size=32000),
                     dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          image_size=224, patch_size=14), 4, 256, [256, 64], torch.bfloat16),
    # For a smoke run of the script itself.
    "tiny": Shape("tiny", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=512),
                  dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                       patch_size=2),
                  2, 32, [256, 64], torch.float32),
}

FUSIONS = ("none", "adem", "prefix")
VARIANTS = ("llm", *FUSIONS)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Benchmark text: a prompt of whole words and an answer, as a real tokenizer would split them.
FILLER = "The quick brown fox jumps over the lazy dog. "
ANSWER = " answer."


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the benchmark's own text, so words and the image prefix take as many tokens as
    in SmolLM2's or LLaMA's tokenizer ("Image: " is 3 tokens, as there), not one per byte."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([FILLER * 4, ANSWER, "Image: ", "Image: N/A"], trainer)  # the model's default prefixes
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def random_tower(build: Callable[[], torch.nn.Module], dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A tower of random weights in `dtype` on `device`. On the CPU it is built in float32 and cast; on any other
    device it is built there, in `dtype`, from the start: LLaMA-7B in float32 on the host would take 28 GB."""
    if device.type == "cpu":
        return build().to(device, dtype)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            return build()
    finally:
        torch.set_default_dtype(default_dtype)


def build_variants(shape: Shape, device: torch.device, fusions: Sequence[str] = FUSIONS
                   ) -> tuple[LlamaForCausalLM, dict[str, AdemVL]]:
    torch.manual_seed(0)
    tokenizer = word_tokenizer()
    llm_config = LlamaConfig(**shape.llm, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    llm = random_tower(lambda: LlamaForCausalLM(llm_config), shape.dtype, device)
    variants = {}
    for fusion in fusions:
        # One tower per variant: a tower's adapters are attached to it for good.
        tower = (random_tower(lambda: CLIPVisionModel(CLIPVisionConfig(**shape.vision)), shape.dtype, device)
                 if fusion != "none" else None)
        config = AdemVLConfig(fusion=fusion, down_sample_num=shape.down_sample_num)
        model = AdemVL(llm, tokenizer, tower, config, compute_dtype=shape.dtype)
        variants[fusion] = model.to(device).train()
    return llm, variants


def make_batch(shape: Shape, tokenizer: PreTrainedTokenizerFast, device: torch.device, padded: bool) -> dict:
    """text_tokens tokens of text per sample: a prompt of whole words, then the answer. `padded`: the first sample's
    prompt a quarter shorter, so the batch is left-padded as a batch of varied prompts is (the fusion then runs its
    padding path: padding positions selected away in every layer)."""
    answer_tokens = len(tokenizer(ANSWER, add_special_tokens=False).input_ids)
    filler = tokenizer(FILLER * shape.text_tokens, add_special_tokens=False).input_ids
    prompt_tokens = shape.text_tokens - answer_tokens
    prompts = [tokenizer.decode(filler[:prompt_tokens]) for _ in range(shape.batch)]
    if padded:
        prompts[0] = tokenizer.decode(filler[: prompt_tokens - shape.text_tokens // 4])
    return {
        "image": torch.randn(shape.batch, 3, shape.vision["image_size"], shape.vision["image_size"], device=device),
        "has_image": torch.ones(shape.batch, dtype=torch.long),
        "text_input": prompts,
        "text_output": [ANSWER] * shape.batch,
    }


def labelled_columns(encoded: EncodedBatch) -> int:
    """How many of the last columns hold a label in some row. A batch knows it on the host today; at 11b3933 (a
    --compare baseline) it did not, and this counts it from the labels as that revision's model did."""
    if hasattr(encoded, "labelled_columns"):
        return encoded.labelled_columns
    columns = (encoded.labels != -100).any(dim=0).nonzero()
    return encoded.labels.shape[1] - int(columns[0]) if len(columns) else 0


def llm_step(llm: LlamaForCausalLM, variant: AdemVL, batch: dict) -> Callable[[], None]:
    """The limit: the same tokens through the bare LLM, backward to the input embeddings; like the model, it
    projects to the vocabulary only the positions that predict a label."""
    encoded = variant.encode_batch(batch, with_answer=True)
    keep = labelled_columns(encoded) + 1

    def step() -> None:
        embeds = llm.get_input_embeddings()(encoded.input_ids).detach().requires_grad_(True)
        with variant.autocast():
            logits = llm(inputs_embeds=embeds, attention_mask=encoded.attention_mask, position_ids=encoded.position_ids,
                         use_cache=False, **variant.logits_to_keep(embeds, keep)).logits
        answer_loss(logits, encoded.labels).backward()

    return step


def train_step(model: AdemVL, batch: dict) -> Callable[[], None]:
    def step() -> None:
        model(batch)["loss"].backward()
        model.zero_grad(set_to_none=True)

    return step


def saved_bytes(step: Callable[[], None], model: torch.nn.Module) -> int:
    """Bytes of the storages that backward reads from what autograd saved during one step (activation memory):
    each storage counted once, whatever views of it are saved; the model's own weights are not counted, nor
    tensors saved for a branch that backward never reaches (e.g. an output nobody uses)."""
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    storages: dict[int, int] = {}

    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if tensor.device.type != "meta" and storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: tensor, unpack):
        step()
    return sum(storages.values())


class OperationCounter(TorchDispatchMode):
    """Counts, by name, the aten operations that reach the kernels (below autograd), forward and backward alike."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.name()] += 1
        return func(*args, **(kwargs or {}))


def dispatched_operations(step: Callable[[], None]) -> int:
    """Kernel calls in one run of `step`: deterministic, so a change in the work a step does shows on any machine,
    however noisy its timings (each call also costs host time: a small kernel's is mostly launch overhead)."""
    with OperationCounter() as counter:
        step()
    return counter.counts.total()


def timed(step: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_cuda_bytes(step: Callable[[], None]) -> int:
    """Peak CUDA allocation during one step above what was allocated before it (the resident weights)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - resident


def analytic_flops(shape: Shape, fusion: str, context: int, num_patches: int) -> float:
    """Forward FLOPs (2 per multiply-add) to read `context` text tokens and produce one new token."""
    d, layers, inter = shape.llm["hidden_size"], shape.llm["num_hidden_layers"], shape.llm["intermediate_size"]
    heads, kv_heads = shape.llm["num_attention_heads"], shape.llm.get("num_key_value_heads", shape.llm["num_attention_heads"])
    vocab = shape.llm["vocab_size"]
    tokens = context + (num_patches + 1 if fusion == "prefix" else 0) + (1 if fusion == "adem" else 0)
    projections = 2 * d * (d + 2 * d * kv_heads // heads + d) + 2 * 3 * d * inter
    # Scores and weighted sum against all previous tokens (average position ~ tokens / 2, x2 causal).
    attention = 2 * 2 * d * tokens
    per_token = layers * (projections + attention / 2) + 2 * d * vocab
    flops = tokens * per_token
    if fusion == "adem":
        flops += layers * tokens * 2 * 2 * sum(shape.down_sample_num) * d
    if fusion != "none":
        width, vision_layers = shape.vision["hidden_size"], shape.vision["num_hidden_layers"]
        vision_tokens = num_patches + 1
        flops += (vision_layers - 1) * vision_tokens * (2 * 4 * width * width + 2 * 2 * width * shape.vision["intermediate_size"]
                                                         + 2 * 2 * vision_tokens * width)
    return float(flops)


def analytic_train_ratio(shape: Shape, context: int) -> float:
    """adem/llm FLOPs of a training step's decoder layers, a floor for the measured ratio: per token and layer the
    frozen LLM does its projections forward and backward to the input (4 FLOPs per weight) and causal attention
    (2 d T forward, 4 d T backward); the fusion adds 6 matmuls of Nv x d per token (2 forward, 4 backward: the
    gradients of the query, keys and values). The vision tower and the few answer-position logits are left out."""
    d, inter, heads = shape.llm["hidden_size"], shape.llm["intermediate_size"], shape.llm["num_attention_heads"]
    kv_heads = shape.llm.get("num_key_value_heads", heads)
    projection_weights = d * (d + 2 * d * kv_heads // heads + d) + 3 * d * inter
    llm = 4 * projection_weights + 6 * d * context
    fusion = 6 * 2 * sum(shape.down_sample_num) * d
    return 1 + fusion / llm


@dataclass
class RunConfig:
    """What one benchmark process builds (JSON: the driver hands it to a --compare worker as is)."""
    shape: str
    dtypes: list[str]
    variants: list[str]
    new_tokens: int
    warmup: int
    threads: int
    padded: bool


@dataclass
class Plan:
    """How many repeats: at least `repeats`, then more, up to `max_repeats`, until every ratio's 95% interval of the
    median is within +-target (0: exactly `repeats`)."""
    repeats: int
    max_repeats: int
    target: float

    def settled(self, ratios: dict[str, list[float]]) -> bool:
        return not self.target or all(within(spread(values), self.target) for values in ratios.values())


class Session(Protocol):
    """Times one step by key ("float32 train adem") on one tree; `info` is what does not vary between repeats."""
    label: str
    keys: list[str]
    info: dict

    def time(self, key: str) -> float: ...


def device_of_run() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def generation_step(model: AdemVL, batch: dict, new_tokens: int) -> Callable[[], None]:
    samples = {key: value for key, value in batch.items() if key != "text_output"}

    def step() -> None:
        model.eval()
        model.generate(samples, num_beams=1, max_length=new_tokens, min_length=new_tokens)
        model.train()

    return step


def path_steps(shape: Shape, variants: Sequence[str], new_tokens: int, padded: bool, device: torch.device
               ) -> tuple[dict[str, Callable[[], None]], dict]:
    """One arithmetic path's steps by key ("train adem", "generate adem"; `llm` has no generation) and its
    deterministic figures: tokens per sample and activation memory of each training step."""
    llm, models = build_variants(shape, device, [fusion for fusion in FUSIONS if fusion in variants])
    batch = make_batch(shape, models["adem"].tokenizer, device, padded)
    train = {"llm": llm_step(llm, models["adem"], batch)} if "llm" in variants else {}
    train.update({name: train_step(model, batch) for name, model in models.items()})
    owners = {"llm": models["adem"], **models}  # whose weights are not activation memory
    facts = {
        "sequence_tokens": {name: m.encode_batch(batch, with_answer=True).input_ids.shape[1] for name, m in models.items()},
        "memory_bytes": {name: peak_cuda_bytes(step) if device.type == "cuda" else saved_bytes(step, owners[name])
                         for name, step in train.items()},
    }
    steps = {f"train {name}": step for name, step in train.items()}
    steps.update({f"generate {name}": generation_step(model, batch, new_tokens) for name, model in models.items()})
    facts["operations"] = {key: dispatched_operations(step) for key, step in steps.items()}
    return steps, facts


class LocalSession:
    """Every arithmetic path's steps built in this process, warmed up, timed by key ("float32 train adem")."""

    def __init__(self, label: str, config: RunConfig):
        self.label = label
        self.device = device_of_run()
        cpu = cpu_kind()
        self.steps: dict[str, Callable[[], None]] = {}
        paths = {}
        for dtype in config.dtypes:
            shape = dataclasses.replace(SHAPES[config.shape], dtype=DTYPES[dtype])
            steps, facts = path_steps(shape, config.variants, config.new_tokens, config.padded, self.device)
            self.steps.update({f"{dtype} {key}": step for key, step in steps.items()})
            paths[dtype] = {"arithmetic": arithmetic_path(dtype, self.device, cpu), **facts}
        for _ in range(config.warmup):  # one-time costs (allocator, kernel selection) stay out of the repeats
            for step in self.steps.values():
                step()
        self.keys = list(self.steps)
        self.info = {"machine": machine(), "lavis_ademvl": str(Path(lavis_ademvl.__file__).parent), "keys": self.keys,
                     "paths": paths}

    def time(self, key: str) -> float:
        return timed(self.steps[key], self.device)


def rotated(items: Sequence, by: int) -> list:
    """`items` starting at index `by` (mod its length): which one runs first changes from repeat to repeat."""
    by %= len(items)
    return [*items[by:], *items[:by]]


RatioSpec = tuple[tuple[str, str], tuple[str, str]]  # (session label, key) of the numerator and of the denominator


def ratio_specs(labels: Sequence[str], dtypes: Sequence[str], variants: Sequence[str]) -> dict[str, RatioSpec]:
    """Each timing ratio by name, as a quotient of two step times of one repeat. Step-time ratios (train) read
    numerator/denominator; tokens/s ratios (generate) are the inverse quotient of times. Per tree and path: the
    fusion against its references; per tree, each other path against the first; with two trees, each step of the
    first tree against the second's."""
    def train(label: str, dtype: str, a: str, b: str) -> RatioSpec:
        return (label, f"{dtype} train {a}"), (label, f"{dtype} train {b}")

    specs: dict[str, RatioSpec] = {}
    for label in labels:
        tree = f"{label} " if len(labels) > 1 else ""
        for dtype in dtypes:
            for other in ("llm", "none"):
                if other in variants:
                    specs[f"{tree}{dtype}: train adem/{other}"] = train(label, dtype, "adem", other)
            if "prefix" in variants:
                specs[f"{tree}{dtype}: train prefix/adem"] = train(label, dtype, "prefix", "adem")
            if "none" in variants:
                specs[f"{tree}{dtype}: generate tokens/s adem/none"] = ((label, f"{dtype} generate none"),
                                                                         (label, f"{dtype} generate adem"))
        for dtype in dtypes[1:]:
            specs[f"{tree}{dtype}/{dtypes[0]}: train adem"] = ((label, f"{dtype} train adem"), (label, f"{dtypes[0]} train adem"))
            specs[f"{tree}{dtype}/{dtypes[0]}: generate tokens/s adem"] = ((label, f"{dtypes[0]} generate adem"),
                                                                          (label, f"{dtype} generate adem"))
    if len(labels) == 2:
        first, second = labels
        for dtype in dtypes:
            for variant in variants:
                key = f"{dtype} train {variant}"
                specs[f"{first}/{second} {dtype}: train {variant}"] = (first, key), (second, key)
            for variant in (v for v in variants if v != "llm"):
                key = f"{dtype} generate {variant}"
                specs[f"{first}/{second} {dtype}: generate tokens/s {variant}"] = (second, key), (first, key)
    return specs


Samples = dict[str, dict[str, list[float]]]  # session label -> step key -> seconds, one per repeat


def ratio_values(samples: Samples, specs: dict[str, RatioSpec]) -> dict[str, list[float]]:
    return {name: per_repeat_ratio(samples[a][key_a], samples[b][key_b]) for name, ((a, key_a), (b, key_b)) in specs.items()}


def measure(sessions: Sequence[Session], specs: dict[str, RatioSpec], plan: Plan) -> Samples:
    """Repeats of every step on every session, interleaved: within a repeat each step runs on each session in turn
    (one process at a time), and both orders rotate from repeat to repeat, so drift hits every timing alike."""
    keys = sessions[0].keys
    samples: Samples = {session.label: {key: [] for key in keys} for session in sessions}
    for repeat in range(plan.max_repeats):
        for key in rotated(keys, repeat):
            for session in rotated(sessions, repeat):
                samples[session.label][key].append(session.time(key))
        if repeat + 1 >= plan.repeats and plan.settled(ratio_values(samples, specs)):
            break
    return samples


@contextlib.contextmanager
def pinned_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set for the run and restored after it (a caller such as pytest keeps its own)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def compared_sessions(rev: str, config: RunConfig, python: str) -> Iterator[list[WorkerSession]]:
    """This checkout and `rev`, each in a worker process running this checkout's benchmark code, started one after
    the other (building and warming up one at a time); the processes end with the block."""
    with tempfile.TemporaryDirectory(prefix="fusion_speed_compare_") as temp:
        folder = Path(temp)
        commit = export_revision(rev, folder / "rev")
        driver = copy_driver(folder / "driver")
        trees = {"checkout": (CHECKOUT, git_revision(CHECKOUT)), rev: (folder / "rev", {"rev": commit, "dirty": False})}
        sessions: list[WorkerSession] = []
        try:
            for label, (tree, revision) in trees.items():
                session = WorkerSession(label, tree, driver, dataclasses.asdict(config), python, config.threads,
                                        folder / f"worker{len(sessions)}.log")
                session.info["revision"] = revision
                sessions.append(session)
            yield sessions
        finally:
            for session in sessions:
                session.close()


def variant_table(config: RunConfig, samples: dict[str, list[float]], dtype: str) -> dict:
    """Per variant of one path: training step seconds and generation tokens/s, each median, quartiles and range."""
    shape = SHAPES[config.shape]
    tokens = shape.batch * config.new_tokens
    train = {v: spread(samples[f"{dtype} train {v}"]) for v in config.variants}
    generate = {}
    for variant in (v for v in config.variants if v != "llm"):
        seconds = spread(samples[f"{dtype} generate {variant}"])
        # tokens/s falls as seconds rise: the quartiles and range swap ends.
        generate[variant] = {"tokens_per_s": tokens / seconds["median"], "q1": tokens / seconds["q3"],
                             "q3": tokens / seconds["q1"], "min": tokens / seconds["max"], "max": tokens / seconds["min"],
                             "seconds": seconds}
    return {"train_step_s": train, "generate": generate}


def deterministic_ratios(label: str, info: dict, dtypes: Sequence[str]) -> dict[str, float]:
    ratios = {}
    for dtype in dtypes:
        memory = info["paths"][dtype]["memory_bytes"]
        operations = info["paths"][dtype]["operations"]
        for other in ("llm", "none"):
            if other in memory:
                ratios[f"{label}{dtype}: memory adem/{other}"] = memory["adem"] / memory[other]
                ratios[f"{label}{dtype}: operations train adem/{other}"] = operations["train adem"] / operations[f"train {other}"]
        if "generate none" in operations:
            ratios[f"{label}{dtype}: operations generate adem/none"] = operations["generate adem"] / operations["generate none"]
    return ratios


def report(config: RunConfig, plan: Plan, sessions: Sequence[Session], samples: Samples,
           specs: dict[str, RatioSpec]) -> dict:
    shape = SHAPES[config.shape]
    num_patches = (shape.vision["image_size"] // shape.vision["patch_size"]) ** 2
    ratios = {}
    for name, values in ratio_values(samples, specs).items():
        summary = spread(values)
        ratios[name] = {**summary, "within_target": within(summary, plan.target) if plan.target else None}
    trees = {}
    deterministic: dict[str, float] = {}
    for session in sessions:
        tree = f"{session.label} " if len(sessions) > 1 else ""
        paths = {dtype: {**session.info["paths"][dtype], **variant_table(config, samples[session.label], dtype)}
                 for dtype in config.dtypes}
        trees[session.label] = {"revision": session.info.get("revision") or git_revision(CHECKOUT),
                                "lavis_ademvl": session.info["lavis_ademvl"], "machine": session.info["machine"],
                                "paths": paths}
        deterministic.update(deterministic_ratios(tree, session.info, config.dtypes))
    if len(sessions) == 2:
        (first, a), (second, b) = ((s.label, s.info["paths"]) for s in sessions)
        for dtype in config.dtypes:
            memory = a[dtype]["memory_bytes"]["adem"] / b[dtype]["memory_bytes"]["adem"]
            deterministic[f"{first}/{second} {dtype}: memory adem"] = memory
            for key in a[dtype]["operations"]:
                deterministic[f"{first}/{second} {dtype}: operations {key}"] = (
                    a[dtype]["operations"][key] / b[dtype]["operations"][key])
    sequence_adem = sessions[0].info["paths"][config.dtypes[0]]["sequence_tokens"]["adem"]
    flops = {fusion: analytic_flops(shape, fusion, 256, num_patches) for fusion in FUSIONS}
    deterministic["flops prefix/adem"] = flops["prefix"] / flops["adem"]
    deterministic["flops train adem/llm (decoder floor)"] = analytic_train_ratio(shape, sequence_adem)
    repeats = len(next(iter(next(iter(samples.values())).values())))
    return {
        "shape": shape.name, "device": str(device_of_run()), "machine": sessions[0].info["machine"],
        "batch": shape.batch, "text_tokens": shape.text_tokens, "new_tokens": config.new_tokens,
        "visual_tokens_adem": sum(shape.down_sample_num), "visual_tokens_prefix": num_patches + 1,
        "dtypes": config.dtypes, "variants": config.variants, "padded": config.padded, "threads": config.threads,
        "warmup": config.warmup,
        "repeats": repeats, "plan": dataclasses.asdict(plan),
        "target_reached": all(r["within_target"] for r in ratios.values()) if plan.target else None,
        "memory_kind": ("peak CUDA allocation above the weights" if device_of_run().type == "cuda"
                        else "autograd-saved activations"),
        "trees": trees, "ratios": ratios, "deterministic": deterministic,
        "flops_one_token_at_256": flops, "samples_s": samples,
    }


def markdown(result: dict) -> str:
    plan = result["plan"]
    target = (f"target +-{plan['target']:.1%} on each ratio's 95% interval of the median: "
              f"{'reached' if result['target_reached'] else 'NOT reached for the ratios marked no'}" if plan["target"]
              else "no target")
    padding = ", left-padded: one prompt a quarter shorter" if result["padded"] else ""
    lines = [f"### {result['shape']} on {result['device']} (batch {result['batch']}, {result['text_tokens']} text tokens"
             f"{padding}, {result['new_tokens']} new tokens)", "",
             f"Machine: {describe(result['machine'])}. {result['repeats']} repeats after {result['warmup']} warm-up, "
             f"steps interleaved in a rotated order; {target}."]
    for label, tree in result["trees"].items():
        revision = tree["revision"]
        lines.append(f"Tree `{label}`: {(revision['rev'] or 'unknown')[:12]}{' with local changes' if revision['dirty'] else ''}")
    for label, tree in result["trees"].items():
        for path in tree["paths"].values():
            heading = f"{label}, {path['arithmetic']}" if len(result["trees"]) > 1 else path["arithmetic"]
            lines += ["", f"#### {heading}", "", "| variant | train step s median (min-max) | generate tokens/s median (min-max) "
                      "| memory MB | aten operations, train / generate | FLOPs, 1 token at T=256 |", "|---|---|---|---|---|---|"]
            for variant in result["variants"]:
                step = path["train_step_s"][variant]
                tokens = path["generate"].get(variant)
                generated = "-" if tokens is None else f"{tokens['tokens_per_s']:.1f} ({tokens['min']:.1f}-{tokens['max']:.1f})"
                flops = result["flops_one_token_at_256"].get(variant)
                operations = path["operations"]
                counts = f"{operations[f'train {variant}']} / {operations.get(f'generate {variant}', '-')}"
                lines.append(f"| {variant} | {step['median']:.3f} ({step['min']:.3f}-{step['max']:.3f}) | {generated} | "
                             f"{path['memory_bytes'][variant] / 2**20:.0f} | {counts} | "
                             f"{'-' if flops is None else f'{flops / 1e12:.3f}T'} |")
    lines += ["", "| ratio, per repeat | median | IQR | min-max | 95% interval of the median | +- | within target |",
              "|---|---|---|---|---|---|---|"]
    for name, r in result["ratios"].items():
        interval = f"{r['ci95'][0]:.3f}-{r['ci95'][1]:.3f}" if r["ci95"] else "too few repeats"
        half = f"{r['half_width']:.1%}" if r["half_width"] is not None else "-"
        reached = {True: "yes", False: "no", None: "-"}[r["within_target"]]
        lines.append(f"| {name} | {r['median']:.3f} | {r['q1']:.3f}-{r['q3']:.3f} | {r['min']:.3f}-{r['max']:.3f} | "
                     f"{interval} | {half} | {reached} |")
    lines += ["", "| deterministic | value |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in result["deterministic"].items()]
    lines.append(f"\nmemory: {result['memory_kind']}")
    return "\n".join(lines)


def serve(config: RunConfig) -> None:
    """--worker: build and warm up, reply with the session's record, then time one step per line of stdin. Replies
    go to the original stdout alone; anything else this process prints goes to stderr (the driver's log)."""
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    torch.set_num_threads(config.threads)  # with OMP_NUM_THREADS and MKL_NUM_THREADS from the driver
    session = LocalSession("worker", config)
    print(json.dumps({"ready": session.info}), file=replies)
    for line in sys.stdin:
        print(json.dumps({"seconds": session.time(line.strip())}), file=replies)


def listed(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """argparse type: a comma-separated list of some of `choices`, in the order given."""
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices)}")
        return items

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fusion_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: llama7b on CUDA, else smollm2")
    parser.add_argument("--dtypes", type=listed(list(DTYPES)), default=None,
                        help="arithmetic paths, e.g. float32,bfloat16 (bfloat16: the frozen towers in bfloat16 under "
                             "autocast); default: the shape's own (float32 on CPU, bfloat16 for llama7b)")
    parser.add_argument("--variants", type=listed(VARIANTS), default=list(VARIANTS),
                        help="which variants to time (adem always: every ratio is against it)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads, pinned (workers also get OMP_NUM_THREADS and MKL_NUM_THREADS); default: %(default)s")
    parser.add_argument("--repeats", type=int, default=7, help="repeats at least (6 or more give a 95%% interval)")
    parser.add_argument("--max-repeats", type=int, default=20, help="repeats at most while a ratio misses the target")
    parser.add_argument("--target-spread", type=float, default=0.02,
                        help="relative half-width of each ratio's 95%% interval of the median to reach; 0: none")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of every step before the repeats")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--padded", action="store_true",
                        help="left-pad the batch (one prompt a quarter shorter), as a batch of varied prompts is")
    parser.add_argument("--compare", metavar="REV", help="also time the model code of commit REV, interleaved with "
                                                         "this checkout's, each in its own process")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter of the --compare processes (a revision before transformers 5 support, such as "
                             "11b3933, needs the transformers 4 stack's: .venv-transformers4/bin/python)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a --compare process: its RunConfig as JSON
    args = parser.parse_args(argv)
    if args.worker:
        serve(RunConfig(**json.loads(args.worker)))
        return 0
    if "adem" not in args.variants:
        parser.error("--variants must include adem: every ratio is against it")
    device = device_of_run()
    shape = args.shape or ("llama7b" if device.type == "cuda" else "smollm2")
    default_dtypes = [next(name for name, dtype in DTYPES.items() if dtype == SHAPES[shape].dtype)]
    dtypes = args.dtypes or default_dtypes
    config = RunConfig(shape, dtypes, [v for v in VARIANTS if v in args.variants], args.new_tokens, args.warmup, args.threads,
                       args.padded)
    plan = Plan(args.repeats, max(args.repeats, args.max_repeats), args.target_spread)
    with contextlib.ExitStack() as stack:
        if args.compare:
            # The processes start in a temporary folder: a relative interpreter path is made absolute first.
            python = os.path.abspath(args.python) if os.sep in args.python else args.python
            sessions: list[Session] = stack.enter_context(compared_sessions(args.compare, config, python))
        else:
            stack.enter_context(pinned_threads(args.threads))
            sessions = [LocalSession("checkout", config)]
        specs = ratio_specs([s.label for s in sessions], config.dtypes, config.variants)
        samples = measure(sessions, specs, plan)
        result = report(config, plan, sessions, samples, specs)
    args.out.mkdir(parents=True, exist_ok=True)
    # One file per kind of run: the shape's own path alone is the plain name gpu_check reads.
    stem = f"fusion_speed_{shape}_{device.type}" + ("" if dtypes == default_dtypes else f"_{'-'.join(dtypes)}")
    stem += ("_padded" if args.padded else "") + (f"_vs_{re.sub(r'[^A-Za-z0-9.-]', '_', args.compare)}" if args.compare else "")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (args.out / f"{stem}.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
