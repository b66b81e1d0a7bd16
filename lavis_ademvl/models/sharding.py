"""FSDP2 sharding of the frozen towers over the ranks of a `torchrun` job (`run.distributed_strategy: fsdp`).

Under DDP every rank holds the whole frozen LLM and vision tower, so the largest LLM is what one GPU holds. Here each
rank holds 1/N of them: PyTorch's `fully_shard` makes every decoder layer, the input embeddings, [final norm, output
embeddings] and every tower block that runs one unit, whose weights are gathered just before it runs and freed after.
The ~4.5M trainable weights of ADEM-VL are not sharded: they stay whole on every rank, where the runner's DDP wrap
averages their gradients as it does without sharding, so checkpoints, resume and the optimizer are those of a DDP run.
The mesh is 1-D (shard over every rank), or 2-D with `shard_size` (HSDP: shard within groups of that many ranks,
typically a node, replicate across them). No mixed-precision policy: the towers keep the dtype they were loaded in
(`model.llm_dtype`), and the model autocasts as it does unsharded.

Every rank must run the same sequence of sharded units, or the gathers wait for ever: see `keep_in_step`, and the
`synced_gpus` that `AdemVL.generate_token_ids` passes to Hugging Face's generation.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from huggingface_hub import snapshot_download
from safetensors import safe_open
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Shard

from lavis_ademvl.models.memory import decoder_layers
from lavis_ademvl.models.vision_towers import tower_blocks

SHARD_DIM = "shard"
REPLICATE_DIM = "replicate"


def frozen_mesh(device_type: str, shard_size: int | None = None) -> DeviceMesh:
    """The mesh the frozen towers are sharded over: every rank of the process group, or (HSDP) groups of `shard_size`
    consecutive ranks that each hold one whole copy (`run.fsdp_shard_size`)."""
    if not dist.is_initialized():
        raise RuntimeError("run.distributed_strategy=fsdp shards the frozen towers over the ranks of a torchrun job; "
                           "this process is in no process group")
    world = dist.get_world_size()
    if shard_size is None or shard_size == world:
        return init_device_mesh(device_type, (world,), mesh_dim_names=(SHARD_DIM,))
    if shard_size < 1 or world % shard_size:
        raise ValueError(f"run.fsdp_shard_size={shard_size} must divide the number of ranks ({world})")
    return init_device_mesh(device_type, (world // shard_size, shard_size), mesh_dim_names=(REPLICATE_DIM, SHARD_DIM))


def llm_units(llm: nn.Module) -> list[nn.Module | list[nn.Module]]:
    """The LLM's FSDP units, in the order they run: the input embeddings, each decoder layer, then the final norm with
    the output embeddings. Tied input and output embeddings are one tensor, so they form one unit with the norm."""
    embeddings, head = llm.get_input_embeddings(), llm.get_output_embeddings()
    norm = getattr(llm.get_decoder(), "norm", None)
    tail = [module for module in (norm, head) if module is not None]
    if head is not None and head.weight is embeddings.weight:
        return [*decoder_layers(llm), [embeddings, *tail]]
    return [embeddings, *decoder_layers(llm), tail]


def shard_units(root: nn.Module, units: Iterable[nn.Module | list[nn.Module]], mesh: DeviceMesh,
                keep_root_gathered: bool) -> None:
    """`fully_shard` each unit, then `root` (what no unit holds). `keep_root_gathered`: the root's own weights stay
    gathered after its forward (a tower whose final norm ADEM-VL applies after the tower has run)."""
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    fully_shard(root, mesh=mesh, reshard_after_forward=not keep_root_gathered)


@torch.no_grad()
def run_through_root(llm: nn.Module) -> None:
    """One forward of the sharded LLM over one token, now: FSDP takes the first unit to run forward for the root, and
    ADEM-VL calls the input embeddings on their own before the LLM (`AdemVL._input_embeddings`), which would then be
    taken for a root and the LLM's own forward refused."""
    llm(input_ids=torch.zeros(1, 1, dtype=torch.long, device=llm.get_input_embeddings().weight.device), use_cache=False)


def shard_frozen_towers(model: nn.Module, mesh: DeviceMesh, llm_source: str | None = None) -> None:
    """Shard the frozen LLM and vision tower of an ADEM-VL model over `mesh`, in place; its trainable modules (none of
    which lives inside a tower: adapters and the visual memory reach the towers through hooks) stay whole.
    `llm_source`: the folder or hub name whose weights fill an LLM built on the meta device (`towers.meta_llm`), each
    rank reading its own rows only."""
    if is_sharded(model.llm):
        return
    trainable_in_towers = [name for name, parameter in model.named_parameters()
                           if parameter.requires_grad and name.startswith(("llm.", "vision_tower."))]
    if trainable_in_towers:  # FSDP would shard them, and the DDP wrap expects every trainable weight whole
        raise ValueError(f"trainable weights inside the frozen towers cannot be sharded: {trainable_in_towers[:4]}")
    on_meta = any(parameter.is_meta for parameter in model.llm.parameters())
    if on_meta and llm_source is None:
        raise ValueError("the LLM is on the meta device, and no checkpoint was given to read its weights from")
    shard_units(model.llm, llm_units(model.llm), mesh, keep_root_gathered=False)
    if on_meta:
        load_llm_shards(model.llm, llm_source, mesh.device_type)
    run_through_root(model.llm)
    if model.vision_tower is not None:
        shard_units(model.vision_tower, list(tower_blocks(model.vision_tower)), mesh, keep_root_gathered=True)
    model.backbone_identity()  # computed now, on every rank: the sampled values are read through collectives


# ---------------------------------------------------------------------- reading each rank's shard


def safetensors_files(name_or_path: str) -> list[Path]:
    """The safetensors files of an LLM checkpoint (a folder, or a hub name: its files in the Hugging Face cache, fetched
    if the cache lacks them, as `from_pretrained` would)."""
    folder = Path(os.path.expanduser(name_or_path))
    if not folder.is_dir():
        folder = Path(snapshot_download(name_or_path, allow_patterns=["*.safetensors", "*.json"]))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise FileNotFoundError(f"model.llm_model={name_or_path!r}: frozen_sharding=fsdp reads the LLM's weights shard by "
                            f"shard from safetensors files (model.safetensors, or model.safetensors.index.json and its "
                            f"files), and {folder} holds neither")


def load_llm_shards(llm: nn.Module, name_or_path: str, device: str | torch.device) -> None:
    """Give the sharded parameters of an LLM built on the meta device storage on `device`, and fill each with this
    rank's rows of the checkpoint's tensor (read from the files, never the whole tensor). The buffers computed when the
    LLM was built are kept: `to_empty` would leave them uninitialised. Every parameter must be in the files, with its
    shape, and every tensor of the files a parameter: else a ValueError naming the folder and the keys."""
    buffers = dict(llm.named_buffers(remove_duplicate=False))
    aliases: dict[int, list[str]] = {}
    for name, parameter in llm.named_parameters(remove_duplicate=False):  # tied weights: one tensor, two names
        aliases.setdefault(id(parameter), []).append(name)
    llm.to_empty(device=device)
    for name, buffer in buffers.items():
        owner, _, leaf = name.rpartition(".")
        setattr(llm.get_submodule(owner), leaf, buffer.to(device))  # a buffer's name: stays a buffer, as persistent
    # `to_empty` gives each name of a tied weight its own tensor; FSDP keeps the first module's (and ties the others to
    # it again at its next gather), so that one is filled.
    parameters = {key: llm.get_parameter(names[0]) for key, names in aliases.items()}
    ignored = [re.compile(pattern) for pattern in getattr(llm, "_keys_to_ignore_on_load_unexpected", None) or []]
    missing, mismatched, found = [], [], set()
    with contextlib.ExitStack() as files:
        handles = {}
        for path in safetensors_files(name_or_path):
            handle = files.enter_context(safe_open(str(path), framework="pt"))
            handles.update({key: handle for key in handle.keys()})
        for key, parameter in parameters.items():
            stored = next((name for name in aliases[key] if name in handles), None)
            if stored is None:
                missing.append(aliases[key][0])
                continue
            found.update(aliases[key])
            tensor = handles[stored].get_slice(stored)
            if list(tensor.get_shape()) != list(parameter.shape):
                mismatched.append(f"{stored} {tuple(tensor.get_shape())} there, {tuple(parameter.shape)} here")
                continue
            local = parameter.to_local() if isinstance(parameter, DTensor) else parameter.data
            start, count = shard_rows(parameter.shape[0], parameter.device_mesh) if isinstance(parameter, DTensor) \
                else (0, parameter.shape[0])
            with torch.no_grad():
                local.copy_(tensor[start : start + count])
    unexpected = sorted(key for key in handles if key not in found and key not in buffers
                        and not any(pattern.search(key) for pattern in ignored))
    problems = {"missing (they would start uninitialised)": sorted(missing), "unexpected": unexpected,
                "of another shape": mismatched}
    found_problems = [f"{kind}: {keys[:8]}{' ...' if len(keys) > 8 else ''} ({len(keys)})"
                      for kind, keys in problems.items() if keys]
    if found_problems:
        raise ValueError(f"model.llm_model={name_or_path!r} does not load completely into {type(llm).__name__} "
                         "(frozen_sharding=fsdp); weights " + "; ".join(found_problems))


def is_sharded(module: nn.Module | None) -> bool:
    return isinstance(module, FSDPModule)


def shard_rows(rows: int, mesh: DeviceMesh) -> tuple[int, int]:
    """(first row, row count) of this rank's shard of a tensor of `rows` rows sharded on dim 0 over `mesh`'s shard
    dimension: torch.chunk's split, as FSDP2 makes it (ceil(rows / N) rows each, the last shards shorter or empty)."""
    size, index = mesh[SHARD_DIM].size(), mesh[SHARD_DIM].get_local_rank()
    chunk = math.ceil(rows / size)
    start = min(rows, index * chunk)
    return start, min(rows, start + chunk) - start


def sampled_values(tensor: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """tensor.reshape(-1)[positions] as float32 on the host, for a whole tensor or a DTensor sharded on dim 0 (then a
    collective: every rank of its mesh must call it, in the same order)."""
    if not isinstance(tensor, DTensor):
        return tensor.detach().reshape(-1)[positions.to(tensor.device)].float().cpu()
    mesh = tensor.device_mesh
    if tensor.placements[-1] != Shard(0):
        raise ValueError(f"a DTensor placed {tensor.placements} is not an FSDP shard")
    row_size = math.prod(tensor.shape[1:])
    start, count = shard_rows(tensor.shape[0], mesh)
    rows = positions // row_size
    mine = (rows >= start) & (rows < start + count)
    local = tensor.to_local().detach().reshape(-1)
    values = torch.zeros(positions.numel(), dtype=torch.float32, device=local.device)
    values[mine.to(local.device)] = local[(positions[mine] - start * row_size).to(local.device)].float()
    dist.all_reduce(values, group=mesh.get_group(SHARD_DIM))  # each value is on exactly one rank of the shard group
    return values.cpu()


def keep_in_step(model: nn.Module, passes: int) -> int:
    """The number of LLM passes every rank makes where this rank needs `passes` (the most any rank needs); the same
    number where the LLM is not sharded. Ranks whose data needs fewer make the rest with `idle_llm_pass`."""
    if not is_sharded(model.llm):
        return passes
    most = torch.tensor([passes], dtype=torch.int64, device=model.device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most.item())
