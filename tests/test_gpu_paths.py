"""Issue #23: the CUDA paths, checked on the CPU. Each test pins a rule whose breach crashes or silently misbehaves on
a GPU: where index tensors live, what moving a device-mapped model moves, which dtype and loss scaling a run gets,
what DDP owns, which host reads a training step makes, and what padding contributes to the fusion."""
from __future__ import annotations

import sys

import pytest
import torch
from cli import REPO, TINY_SQA
from helpers import make_batch, tiny_config, tiny_model
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.fusion_speed import OperationCounter
from lavis_ademvl.common.launch import prepare, set_model_device
from lavis_ademvl.models import memory as memory_module
from lavis_ademvl.models import towers
from lavis_ademvl.models.ademvl import AdemVL, answer_loss
from lavis_ademvl.models.config import AdemVLConfig
from lavis_ademvl.models.memory import VisualMemory
from lavis_ademvl.models.scoring import kv_cache_argument
from lavis_ademvl.runners.runner_ademvl import frozen_state_names, needs_loss_scaling, upload


def device_mapped_model(tmp_path, **overrides) -> AdemVL:
    """The tiny model with its LLM loaded from a folder through a Hugging Face device map (accelerate's dispatch)."""
    LlamaForCausalLM(LlamaConfig(**tiny_config()["llm_config"])).save_pretrained(tmp_path / "llm")
    return tiny_model(llm_model=str(tmp_path / "llm"), llm_config=None, llm_device_map={"": "cpu"}, **overrides)


# ------------------------------------------------------------------ 2. index tensors on the device they index


class IndexSpy:
    """Records every index tensor the model hands to the LLM (`logits_to_keep`) and to its KV cache."""

    def __init__(self, model: AdemVL) -> None:
        self.devices: list[tuple[str, torch.device]] = []
        original_forward = model.llm.forward

        def forward(*args, **kwargs):
            if isinstance(kwargs.get("logits_to_keep"), torch.Tensor):
                self.devices.append(("logits_to_keep", kwargs["logits_to_keep"].device))
            output = original_forward(*args, **kwargs)
            cache = getattr(output, "past_key_values", None)
            if cache is not None and not hasattr(cache, "_spied"):
                original_select = cache.batch_select_indices

                def batch_select_indices(indices):
                    self.devices.append(("batch_select_indices", indices.device))
                    return original_select(indices)

                cache.batch_select_indices, cache._spied = batch_select_indices, True
            return output

        model.llm.forward = forward


def test_index_tensors_of_a_device_mapped_llm_are_on_the_cpu(tmp_path):
    """The layers and the head of a device-mapped LLM live on several GPUs; an index built on the embeddings' device
    indexes a tensor on another one (a crash). A CPU index indexes a tensor on any device."""
    model = device_mapped_model(tmp_path).eval()
    spy = IndexSpy(model)
    batch = make_batch()
    model(batch)
    model.predict_answers(batch, inference_method="rank", answer_list=[[" A.", " B."]] * 4)
    kinds = {kind for kind, _ in spy.devices}
    assert kinds == {"logits_to_keep", "batch_select_indices"}, spy.devices
    assert all(device == torch.device("cpu") for _, device in spy.devices)


def test_index_tensors_of_a_single_device_llm_are_on_its_device():
    """On one device the index is built where it is used: no copy (and no host synchronisation) per forward."""
    model = tiny_model().eval()
    assert not model.llm_spans_devices
    batch = make_batch()
    embeds = torch.zeros(4, 9, 64, device="meta")
    assert model.logits_to_keep(embeds, 3)["logits_to_keep"].device.type == "meta"
    spy = IndexSpy(model)
    model.predict_answers(batch, inference_method="rank", answer_list=[[" A.", " B."]] * 4)
    assert spy.devices and all(device == model.device for _, device in spy.devices)


def test_the_loss_reads_its_labels_on_the_device_of_the_logits():
    """A device map puts the LLM head (the logits) on the last GPU while the labels are uploaded to the first."""
    logits = torch.randn(2, 3, 11, device="meta")
    labels = torch.tensor([[-100, 4, 5], [-100, -100, 6]])
    assert answer_loss(logits, labels).device.type == "meta"


# ------------------------------------------------------------------ 3. moving a device-mapped model


def test_moving_a_device_mapped_model_moves_only_adem_vl_modules(tmp_path):
    """`nn.Module.to` would move every dispatched layer to one device under accelerate's hooks; LAVIS's
    load_model_and_preprocess, predict and visualize all call `.to(device)`."""
    model = device_mapped_model(tmp_path)
    assert model.llm_dispatched
    assert model.to("meta") is model
    assert {p.device.type for p in model.llm.parameters()} == {"cpu"}
    assert model.visual_key_offset.device.type == "meta"
    assert {p.device.type for name, p in model.named_parameters() if not name.startswith("llm.")} == {"meta"}
    undispatched = tiny_model().to("meta")
    assert {p.device.type for p in undispatched.parameters()} == {"meta"}


def test_observed_queries_see_the_keys_on_their_own_device():
    """Hooks of a layer on another device read that device's copy of the keys; so does `observe_kept`."""
    layer = torch.nn.Module()
    layer.self_attn, layer.mlp = torch.nn.Identity(), torch.nn.Identity()
    memory = VisualMemory("mlp_in", "mlp_out", 0.1, 0.0, "silu")
    memory.attach([layer])
    seen = []
    memory.observe_kept(lambda index, kept: seen.append(kept.device))
    keys = torch.randn(1, 4, 8)
    with memory.holding(keys, torch.randn(1, 4, 8)):
        query = torch.randn(1, 3, 8, device="meta")
        for hook in layer.mlp._forward_pre_hooks.values():
            hook(layer.mlp, (query,), {})
    assert seen == [torch.device("meta")]


# ------------------------------------------------------------------ 4. quantized LLM under torchrun


def distributed_runner(experiment, model: AdemVL):
    experiment.cfg.run_cfg.distributed = True
    experiment.model = model
    runner = experiment.build_runner()
    assert runner.use_distributed
    return runner


def test_a_quantized_llm_trains_under_ddp_and_ddp_owns_only_trainable_weights(sqa_root, tmp_path, single_process_group):
    """A quantized load places the LLM on the rank's GPU (a device map of one device): it must not be moved, and DDP
    must neither broadcast nor synchronise any frozen weight (13.5 GB per start at 7B)."""
    experiment = prepare(TINY_SQA, [f"datasets.scienceqa_mc.build_info.data_root={sqa_root}",
                                    f"run.output_dir={tmp_path / 'out'}", "run.max_epoch=1", "run.valid_splits=[]"])
    model = experiment.model
    # bitsandbytes needs a GPU: the same model, with the option a quantized load sets (the LLM then stays in place).
    model.config = model.config.replace(llm_quantization="8bit")
    assert model.llm_dispatched and not model.llm_spans_devices
    wrapped = distributed_runner(experiment, model).model
    assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    owned = {name for name, _ in model.named_parameters()} - wrapped.parameters_to_ignore
    assert owned == trainable
    assert {name for name, _ in model.named_buffers()} <= wrapped.parameters_to_ignore
    loss = wrapped(make_batch())["loss"]
    loss.backward()
    assert model.visual_value_offset.grad is not None


def test_a_device_map_over_several_gpus_is_refused_under_torchrun(sqa_root, tmp_path, single_process_group):
    experiment = prepare(TINY_SQA, [f"datasets.scienceqa_mc.build_info.data_root={sqa_root}",
                                    f"run.output_dir={tmp_path / 'out'}", "run.max_epoch=1"])
    runner = distributed_runner(experiment, device_mapped_model(tmp_path))
    with pytest.raises(ValueError, match="llm_device_map spreads one model over several GPUs"):
        _ = runner.model


def test_frozen_state_names_are_the_towers_only():
    model = tiny_model()
    names = set(frozen_state_names(model))
    assert not any(p.requires_grad for name, p in model.named_parameters() if name in names)
    assert {name for name, p in model.named_parameters() if not p.requires_grad} <= names
    assert any(name.startswith("llm.") for name, _ in model.named_buffers()) and all(
        name in names for name, _ in model.named_buffers()
    )


def test_random_towers_are_the_same_whatever_the_seed():
    """DDP no longer broadcasts the frozen towers, so every rank (seeded seed + rank) must build the same ones."""
    torch.manual_seed(1)
    first = tiny_model()
    torch.manual_seed(2)
    second = tiny_model()
    for (name, a), b in zip(first.llm.state_dict().items(), second.llm.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    for (name, a), b in zip(first.vision_tower.state_dict().items(), second.vision_tower.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert not torch.equal(first.visual_key_offset, second.visual_key_offset)  # what trains still follows the seed


# ------------------------------------------------------------------ 5-7. compute dtype and loss scaling


@pytest.mark.parametrize(
    ("device", "dtype", "amp", "scaled"),
    [
        ("cuda", torch.float16, False, True),
        ("cuda", torch.float16, True, True),
        ("cuda", torch.bfloat16, False, False),
        ("cuda", torch.bfloat16, True, False),
        ("cuda", torch.float32, False, False),
        ("cpu", torch.bfloat16, True, False),
        ("cpu", torch.float32, False, False),
    ],
)
def test_loss_scaling_follows_the_compute_dtype(device, dtype, amp, scaled):
    assert needs_loss_scaling(torch.device(device), dtype, amp) is scaled


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_amp_with_a_float32_model_is_refused(device):
    with pytest.raises(ValueError, match="run.amp is true, but the model computes in float32"):
        needs_loss_scaling(torch.device(device), torch.float32, True)


@pytest.fixture
def gpu_host(monkeypatch):
    """A host with a GPU, as far as the dtype decisions can tell (nothing is allocated on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "test GPU")


def test_the_compute_dtype_follows_the_run_device_not_the_host(gpu_host):
    """run.device=cpu on a GPU host computes in cpu_dtype, not in llm_dtype."""
    config = AdemVLConfig.from_dict(tiny_config(llm_dtype="bfloat16", cpu_dtype="float32", device="cpu"))
    assert towers.model_device(config) == torch.device("cpu")
    assert towers.compute_dtype(config, torch.device("cpu")) == torch.float32
    assert towers.compute_dtype(config, torch.device("cuda", 0)) == torch.bfloat16
    model = AdemVL.from_config(tiny_config(llm_dtype="bfloat16", cpu_dtype="float32", device="cpu"))
    assert model.compute_dtype == torch.float32 and model.llm.dtype == torch.float32
    assert towers.model_device(AdemVLConfig.from_dict(tiny_config())) == torch.device("cuda", 0)  # auto


def test_bfloat16_falls_back_to_float16_with_scaling_on_gpus_without_it(gpu_host, monkeypatch, caplog):
    """V100 and T4 have no bfloat16: float16, whose loss scaling then follows from the dtype."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    config = AdemVLConfig.from_dict(tiny_config(llm_dtype="bfloat16"))
    assert towers.compute_dtype(config, torch.device("cuda", 0)) == torch.float16
    assert "has no bfloat16" in caplog.text
    assert needs_loss_scaling(torch.device("cuda", 0), torch.float16, False)


def test_the_launcher_builds_the_model_for_the_run_device():
    model_cfg = OmegaConf.create({"arch": "ademvl"})
    set_model_device(model_cfg, "cuda", gpu=3)
    assert model_cfg.device == "cuda:3"  # each rank's towers load straight onto its own GPU
    model_cfg = OmegaConf.create({"arch": "ademvl", "device": "cpu"})
    set_model_device(model_cfg, "cpu")
    assert model_cfg.device == "cpu"
    with pytest.raises(ValueError, match="model.device='cuda' but run.device is 'cpu'"):
        set_model_device(OmegaConf.create({"arch": "ademvl", "device": "cuda"}), "cpu")
    other = OmegaConf.create({"arch": "blip2"})
    set_model_device(other, "cpu")
    assert "device" not in other


def test_a_bad_model_device_is_named():
    with pytest.raises(ValueError, match="device='gpu'"):
        AdemVLConfig.from_dict(tiny_config(device="gpu"))


# ------------------------------------------------------------------ 9. host synchronisations


# Ops whose result the host must read from the device: on a GPU each waits for every queued kernel.
SYNC_OPS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "allclose", "masked_select", "unique"}


class SyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def test_a_training_step_reads_nothing_back_beyond_what_the_llm_itself_reads():
    """Every host read in forward and backward is Hugging Face's own (the same count as the bare LLM on the same
    inputs): the label columns, the image flags and the sequence layout are known on the host before upload."""
    model = tiny_model().train()
    batch = make_batch()
    with SyncCounter() as ours:
        model(batch)["loss"].backward()
    encoded = model.encode_batch(batch, with_answer=True)
    embeds = model.llm.get_input_embeddings()(encoded.input_ids).detach().requires_grad_(True)
    with SyncCounter() as bare:
        output = model.llm(inputs_embeds=embeds, attention_mask=encoded.attention_mask,
                           position_ids=encoded.position_ids, use_cache=False)
        output.logits[:, -3:].float().sum().backward()
    assert ours.ops == bare.ops


def test_upload_leaves_the_fields_read_on_the_host_there():
    samples = {"image": torch.zeros(2, 3), "has_image": torch.tensor([1, 0]), "text_input": ["a", "b"],
               "nested": [torch.zeros(1)]}
    moved = upload(samples, torch.device("meta"), AdemVL.host_inputs)
    assert moved["image"].device.type == "meta" and moved["nested"][0].device.type == "meta"
    assert moved["has_image"] is samples["has_image"] and moved["text_input"] == ["a", "b"]


def test_the_runner_reads_the_loss_once_per_optimizer_step(experiment_with_accumulation, monkeypatch):
    """`loss.item()` and a finiteness check every micro-step made the host wait for each forward before queuing its
    backward. Our code now reads no tensor value by `.item()` or `bool()` in a training epoch: the losses of an update
    come back in one `.tolist()` after its backward passes (the data transforms and the optimizer read their own host
    tensors)."""
    ours = str(REPO / "lavis_ademvl")
    reads = []

    def spy(name):
        original = getattr(torch.Tensor, name)

        def read(self):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(ours):
                reads.append((name, caller, sys._getframe(1).f_lineno))
            return original(self)

        monkeypatch.setattr(torch.Tensor, name, read)

    spy("item")
    spy("__bool__")
    runner = experiment_with_accumulation.build_runner()
    stats = runner.train_epoch(0)
    assert reads == [] and float(stats["loss"]) > 0


@pytest.fixture
def experiment_with_accumulation(sqa_root, tmp_path):
    return prepare(TINY_SQA, [f"datasets.scienceqa_mc.build_info.data_root={sqa_root}",
                              f"run.output_dir={tmp_path / 'out'}", "run.max_epoch=1", "run.accum_grad_iters=2"])


# ------------------------------------------------------------------ 10. padding in the fusion


def test_nan_in_padding_rows_reaches_neither_the_loss_nor_any_gradient(monkeypatch):
    """Left-padded rows attend to nothing, which some GPU attention kernels turn into NaN; the fusion must keep them
    out (0 x NaN is NaN, so a product with a mask would not do). Here the queries the fusion reads hold NaN at every
    padding position (the LLM itself computes as usual), in every decoder layer."""
    model = tiny_model().train()
    batch = make_batch()  # with and without image: rows of different lengths, so some are padded
    padding = model.encode_batch(batch, with_answer=True).attention_mask == 0
    assert padding.any()
    read_query = memory_module._module_input

    def poisoned_query(args, kwargs):
        return read_query(args, kwargs).masked_fill(padding.unsqueeze(-1), float("nan"))

    monkeypatch.setattr(memory_module, "_module_input", poisoned_query)
    loss = model(batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


def test_padding_does_not_change_what_real_tokens_compute():
    """The padding mask only removes padding: each sample's loss alone equals its loss in a padded batch."""
    model = tiny_model().eval()
    batch = make_batch()
    logits, encoded = model.answer_logits(batch, with_answer=True)
    assert encoded.padded
    for row in range(4):
        single = {key: value[row : row + 1] if isinstance(value, (list, torch.Tensor)) else value
                  for key, value in batch.items()}
        alone, _ = model.answer_logits(single, with_answer=True)
        keep = alone.shape[1]
        torch.testing.assert_close(logits[row, -keep:], alone[0], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ 1. deterministic pooling (see test_cuda_determinism.py)


def test_scales_that_do_not_divide_the_grid_are_named():
    """Such scales keep adaptive pooling, whose backward raises under run.deterministic on CUDA: the launcher names them
    before anything runs."""
    assert tiny_model().uneven_scales() == []
    assert tiny_model(down_sample_num=[16, 9], num_visual_input_tokens=4).uneven_scales() == [9]
    assert tiny_model(fusion="prefix").uneven_scales() == []


def test_cached_steps_after_a_padded_prompt_run_no_padding_selection():
    """Generation's steps after a left-padded prompt hold only real tokens: they run the ops they run with no padding
    mask held (the padding selection of every layer at every new token cost generation 3.5% more ops from 13fbe26)."""

    model = tiny_model().eval()
    batch = make_batch()
    encoded = model.encode_batch(batch, with_answer=False)
    assert encoded.padded
    keys, values, _ = model.sample_visual_inputs(batch, encoded.input_ids.shape[0])
    embeds = model.llm.get_input_embeddings()(encoded.input_ids)
    cache_key = kv_cache_argument(model.llm)
    counts = []
    for real in (encoded.attention_mask.bool(), None):  # the padding mask held, as llm_inputs holds it; none
        with torch.no_grad(), model.fusion_memory.holding(keys, values, real_tokens=real):
            cache = getattr(model.llm(inputs_embeds=embeds, attention_mask=encoded.attention_mask, use_cache=True),
                            cache_key)
            mask = torch.cat([encoded.attention_mask, torch.ones(embeds.shape[0], 1, dtype=torch.long)], 1)
            with OperationCounter() as counter:
                model.llm(input_ids=torch.zeros(embeds.shape[0], 1, dtype=torch.long), attention_mask=mask,
                          use_cache=True, **{cache_key: cache})
        counts.append(counter.counts)
    assert counts[0] == counts[1]
