"""Cost of ADEM-VL's fusion next to the bare LLM and LLaVA-style input fusion, measured side by side in one process.

  python -m benchmarks.fusion_speed [--shape smollm2|llama7b|tiny] [--repeats 5] [--out benchmarks/results]

Variants share one frozen LLM (random weights of the shape): `llm` (no fusion at all: forward, and backward to the
input embeddings; the physical limit), `none` (ADEM-VL's learned memory without vision), `adem`, and `prefix`
(every CLIP token projected and prepended, 257 at ViT-L/14 shape). Steps are timed interleaved after a warm-up:
a training step (forward + backward to the trainable parameters) and greedy generation of 32 tokens with the KV
cache. Memory is the bytes autograd saves for backward in one training step (CPU) or the step's peak allocation
above the resident weights (CUDA).
Each sample holds `text_tokens` tokens of text (prompt and answer; `adem` adds its "Image: " prefix and [cls] slot)
under a BPE tokenizer trained on that text, so words and the prefix take as many tokens as under SmolLM2's.
Writes JSON and a markdown table; nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lavis_ademvl.models.ademvl import AdemVL, answer_loss
from lavis_ademvl.models.config import AdemVLConfig


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


def build_variants(shape: Shape, device: torch.device) -> tuple[LlamaForCausalLM, dict[str, AdemVL]]:
    torch.manual_seed(0)
    tokenizer = word_tokenizer()
    llm_config = LlamaConfig(**shape.llm, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    llm = random_tower(lambda: LlamaForCausalLM(llm_config), shape.dtype, device)
    variants = {}
    for fusion in ("none", "adem", "prefix"):
        # One tower per variant: a tower's adapters are attached to it for good.
        tower = (random_tower(lambda: CLIPVisionModel(CLIPVisionConfig(**shape.vision)), shape.dtype, device)
                 if fusion != "none" else None)
        config = AdemVLConfig(fusion=fusion, down_sample_num=shape.down_sample_num)
        model = AdemVL(llm, tokenizer, tower, config, compute_dtype=shape.dtype)
        variants[fusion] = model.to(device).train()
    return llm, variants


def make_batch(shape: Shape, tokenizer: PreTrainedTokenizerFast, device: torch.device) -> dict:
    """text_tokens tokens of text per sample: a prompt of whole words, then the answer."""
    answer_tokens = len(tokenizer(ANSWER, add_special_tokens=False).input_ids)
    filler = tokenizer(FILLER * shape.text_tokens, add_special_tokens=False).input_ids
    prompt = tokenizer.decode(filler[: shape.text_tokens - answer_tokens])
    return {
        "image": torch.randn(shape.batch, 3, shape.vision["image_size"], shape.vision["image_size"], device=device),
        "has_image": torch.ones(shape.batch, dtype=torch.long),
        "text_input": [prompt] * shape.batch,
        "text_output": [ANSWER] * shape.batch,
    }


def llm_step(llm: LlamaForCausalLM, variant: AdemVL, batch: dict) -> Callable[[], None]:
    """The limit: the same tokens through the bare LLM, backward to the input embeddings; like the model, it
    projects to the vocabulary only the positions that predict a label."""
    encoded = variant.encode_batch(batch, with_answer=True)
    keep = encoded.labelled_columns + 1

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


def summarize(samples: list[float]) -> dict:
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples), "repeats": len(samples)}


def run(shape_name: str, repeats: int, new_tokens: int, device: torch.device) -> dict:
    shape = SHAPES[shape_name]
    llm, variants = build_variants(shape, device)
    batch = make_batch(shape, variants["adem"].tokenizer, device)
    steps = {"llm": llm_step(llm, variants["adem"], batch), **{name: train_step(m, batch) for name, m in variants.items()}}
    sequence_tokens = {name: m.encode_batch(batch, with_answer=True).input_ids.shape[1] for name, m in variants.items()}

    def generate(model: AdemVL) -> Callable[[], None]:
        samples = {key: value for key, value in batch.items() if key != "text_output"}

        def step() -> None:
            model.eval()
            model.generate(samples, num_beams=1, max_length=new_tokens, min_length=new_tokens)
            model.train()

        return step

    generations = {name: generate(m) for name, m in variants.items()}
    for step in [*steps.values(), *generations.values()]:  # warm-up
        step()
    train_times = {name: [] for name in steps}
    generate_times = {name: [] for name in generations}
    for _ in range(repeats):  # interleaved, so drift hits every variant alike
        for name, step in steps.items():
            train_times[name].append(timed(step, device))
        for name, step in generations.items():
            generate_times[name].append(timed(step, device))
    models = {"llm": variants["adem"], **variants}  # whose weights are not activation memory
    memory = {name: peak_cuda_bytes(step) if device.type == "cuda" else saved_bytes(step, models[name])
              for name, step in steps.items()}
    num_patches = (shape.vision["image_size"] // shape.vision["patch_size"]) ** 2
    result = {
        "shape": shape.name, "device": str(device), "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(), "batch": shape.batch, "text_tokens": shape.text_tokens,
        "visual_tokens_adem": sum(shape.down_sample_num), "visual_tokens_prefix": num_patches + 1,
        "sequence_tokens": sequence_tokens,
        "memory_kind": "peak CUDA allocation above the weights" if device.type == "cuda" else "autograd-saved activations",
        "train_step": {name: summarize(t) for name, t in train_times.items()},
        "generate": {name: {**summarize(t), "tokens_per_s": shape.batch * new_tokens / statistics.median(t)}
                     for name, t in generate_times.items()},
        "memory_bytes": memory,
        "flops_one_token_at_256": {f: analytic_flops(shape, f, 256, num_patches) for f in ("none", "adem", "prefix")},
    }
    train = {name: r["median_s"] for name, r in result["train_step"].items()}
    tokens = {name: r["tokens_per_s"] for name, r in result["generate"].items()}
    result["ratios"] = {
        "train adem/llm": train["adem"] / train["llm"], "train adem/none": train["adem"] / train["none"],
        "train prefix/adem": train["prefix"] / train["adem"],
        "generate tokens/s adem/none": tokens["adem"] / tokens["none"],
        "memory adem/llm": memory["adem"] / memory["llm"], "memory adem/none": memory["adem"] / memory["none"],
        "flops prefix/adem": result["flops_one_token_at_256"]["prefix"] / result["flops_one_token_at_256"]["adem"],
        "flops train adem/llm (decoder floor)": analytic_train_ratio(shape, sequence_tokens["adem"]),
    }
    return result


def markdown(result: dict) -> str:
    lines = [f"### {result['shape']} on {result['device']} (batch {result['batch']}, {result['text_tokens']} text tokens, "
             f"{result['torch_threads']} threads)", "",
             "| variant | train step median (min-max) s | generate tokens/s | memory MB | FLOPs, 1 token at T=256 |",
             "|---|---|---|---|---|"]
    for name in ("llm", "none", "adem", "prefix"):
        step = result["train_step"][name]
        tokens = result["generate"].get(name, {}).get("tokens_per_s")
        flops = result["flops_one_token_at_256"].get(name)
        lines.append(f"| {name} | {step['median_s']:.3f} ({step['min_s']:.3f}-{step['max_s']:.3f}) | "
                     f"{'-' if tokens is None else f'{tokens:.1f}'} | {result['memory_bytes'][name] / 2**20:.0f} | "
                     f"{'-' if flops is None else f'{flops / 1e12:.3f}T'} |")
    lines += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in result["ratios"].items()]
    lines.append(f"\nmemory: {result['memory_kind']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fusion_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: llama7b on CUDA, else smollm2")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = args.shape or ("llama7b" if device.type == "cuda" else "smollm2")
    result = run(shape, args.repeats, args.new_tokens, device)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"fusion_speed_{shape}_{device.type}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (args.out / f"{stem}.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
