"""One codebase on transformers 4.55 and 5.x (issue #33): LAVIS 1.0.2 imports and runs its BERT / Q-Former on both
through lavis_ademvl_compat, the names it restores are checked against a direct statement of their meaning, and the
folders this project writes read the same under both (or are refused where the installed version would misread them).
The suite runs on the default stack (5.x) and its fast lane on the 4.55 stack (.ci/run)."""
from __future__ import annotations

import importlib
import importlib.metadata
import json
import pkgutil

import lavis
import pytest
import torch
from helpers import make_batch, tiny_config, tiny_model
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import lavis_ademvl_compat
from lavis_ademvl.common.hf_folders import check_rope_read, make_portable, rope_settings
from lavis_ademvl.models.tokenization import byte_level_tokenizer

TRANSFORMERS_MAJOR = int(importlib.metadata.version("transformers").split(".")[0])


def test_compat_restores_only_what_this_transformers_lacks():
    assert lavis_ademvl_compat.apply() is lavis_ademvl_compat.RESTORED  # idempotent: nothing is added twice
    restored = set(lavis_ademvl_compat.RESTORED)
    if TRANSFORMERS_MAJOR < 5:
        assert restored == set()
    else:
        assert {"transformers.modeling_utils.apply_chunking_to_forward", "transformers.modeling_utils.prune_linear_layer",
                "transformers.modeling_utils.find_pruneable_heads_and_indices",
                "transformers.pytorch_utils.find_pruneable_heads_and_indices",
                "transformers.utils.model_parallel_utils", "ModuleUtilsMixin.invert_attention_mask",
                "ModuleUtilsMixin.get_head_mask"} <= restored
    # what LAVIS imports, whichever version is installed
    from transformers.modeling_utils import apply_chunking_to_forward, find_pruneable_heads_and_indices  # noqa: F401
    from transformers.pytorch_utils import find_pruneable_heads_and_indices as pytorch_one  # noqa: F401
    from transformers.utils.model_parallel_utils import assert_device_map, get_device_map  # noqa: F401


def test_every_lavis_module_imports():
    names = [info.name for info in pkgutil.walk_packages(lavis.__path__, "lavis.")]
    assert len(names) > 70
    for name in names:
        importlib.import_module(name)


def test_find_pruneable_heads_and_indices_keeps_the_rows_of_the_other_heads():
    # 4 heads of 3 rows; head 1 pruned before (its rows gone: heads 0, 2, 3 remain at row blocks 0, 1, 2); now 1 and 3
    heads, index = lavis_ademvl_compat.find_pruneable_heads_and_indices([1, 3], 4, 3, {1})
    assert heads == {3}
    assert index.tolist() == [0, 1, 2, 3, 4, 5, 9, 10, 11]  # head 3 sits at row block 2 now: rows 6-8 go


def test_device_maps_place_every_block_once():
    assert lavis_ademvl_compat.get_device_map(5, [0, 1]) == {0: [0, 1, 2], 1: [3, 4]}
    lavis_ademvl_compat.assert_device_map({0: [0, 1, 2], 1: [3, 4]}, 5)
    with pytest.raises(ValueError, match=r"blocks \[2\] more than once"):
        lavis_ademvl_compat.assert_device_map({0: [0, 1, 2], 1: [2, 3, 4]}, 5)
    with pytest.raises(ValueError, match=r"blocks \[4\] nowhere"):
        lavis_ademvl_compat.assert_device_map({0: [0, 1, 2], 1: [3]}, 5)


def test_attention_and_head_masks_mean_what_they_meant_in_4x():
    holder = torch.nn.Linear(1, 1).to(torch.float16)  # stands for a model: its dtype is what the masks take
    holder.dtype = torch.float16
    mask = torch.tensor([[1, 0, 1]])
    additive = lavis_ademvl_compat.invert_attention_mask(holder, mask)
    assert additive.shape == (1, 1, 1, 3) and additive.dtype == torch.float16
    assert additive.flatten().tolist() == [0.0, torch.finfo(torch.float16).min, 0.0]
    assert lavis_ademvl_compat.invert_attention_mask(holder, mask[:, None].expand(1, 2, 3)).shape == (1, 1, 2, 3)
    assert lavis_ademvl_compat.get_head_mask(holder, None, 3) == [None, None, None]
    per_layer = lavis_ademvl_compat.get_head_mask(holder, torch.tensor([1.0, 0.0]), 3)
    assert per_layer.shape == (3, 1, 2, 1, 1) and per_layer[:, 0, :, 0, 0].tolist() == [[1.0, 0.0]] * 3


def _tiny_bert_config(bert_config_class):
    config = bert_config_class(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64)
    config.encoder_width, config.add_cross_attention, config.cross_attention_freq, config.query_length = 24, True, 1, 4
    config.add_type_embeddings = False  # as LAVIS's med_config.json sets it
    return config


def _masked_tokens_are_ignored(run) -> None:
    """`run(image_tokens, image_mask)` with the last two image tokens masked equals it without them: the restored
    invert_attention_mask masks what LAVIS's cross-attention is told to ignore, and only that."""
    image = torch.randn(2, 6, 24, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[:, 4:] = 0
    torch.testing.assert_close(run(image, mask), run(image[:, :4], mask[:, :4]), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(run(image, torch.ones_like(mask)), run(image[:, :4], mask[:, :4]), atol=1e-4)


def test_blip2_qformer_builds_and_runs_forward():
    from lavis.models.blip2_models.Qformer import BertConfig, BertLMHeadModel

    torch.manual_seed(0)
    qformer = BertLMHeadModel(_tiny_bert_config(BertConfig)).eval()
    queries = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(1))

    def run(image, mask):
        with torch.no_grad():
            return qformer.bert(query_embeds=queries, encoder_hidden_states=image, encoder_attention_mask=mask,
                                return_dict=True).last_hidden_state

    assert run(torch.zeros(2, 6, 24), torch.ones(2, 6, dtype=torch.long)).shape == (2, 4, 32)
    _masked_tokens_are_ignored(run)
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(2))
    output = qformer(input_ids=ids, labels=ids, return_dict=True)
    assert torch.isfinite(output.loss) and output.logits.shape == (2, 5, 50)


def test_xbert_builds_and_runs_multimodal_forward():
    from lavis.models.med import BertConfig, BertModel

    torch.manual_seed(0)
    xbert = BertModel(_tiny_bert_config(BertConfig), add_pooling_layer=False).eval()
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(2))

    def run(image, mask):
        with torch.no_grad():
            return xbert(input_ids=ids, attention_mask=torch.ones_like(ids), encoder_hidden_states=image,
                         encoder_attention_mask=mask, return_dict=True, mode="multimodal").last_hidden_state

    _masked_tokens_are_ignored(run)


def _llama_folder(tmp_path, theta: float):
    folder = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(**{**tiny_config()["llm_config"], "rope_theta": theta})).save_pretrained(folder)
    return folder


def _as_transformers5_writes_it(folder, theta: float) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_theta", None), config.pop("rope_scaling", None)
    config["rope_parameters"] = {"rope_theta": theta, "rope_type": "default"}
    (folder / "config.json").write_text(json.dumps(config))


def test_a_folder_with_only_rope_parameters_loads_with_its_theta_or_is_refused(tmp_path):
    """transformers 4.x ignores `rope_parameters` and would run rope theta 10000: refused, naming the key."""
    folder = _llama_folder(tmp_path, 12345.0)
    _as_transformers5_writes_it(folder, 12345.0)
    if TRANSFORMERS_MAJOR < 5:
        with pytest.raises(ValueError, match=r"rope_parameters .* are not read by this transformers \(it would use "
                                             r"rope_theta=10000"):
            tiny_model(llm_model=str(folder), llm_config=None)
    else:
        assert rope_settings(tiny_model(llm_model=str(folder), llm_config=None).llm.config)["rope_theta"] == 12345.0


def test_a_portable_folder_loads_with_its_theta_on_either_version(tmp_path):
    folder = _llama_folder(tmp_path, 12345.0)
    _as_transformers5_writes_it(folder, 12345.0)
    make_portable(folder)
    assert json.loads((folder / "config.json").read_text())["rope_theta"] == 12345.0
    model = tiny_model(llm_model=str(folder), llm_config=None)
    assert rope_settings(model.llm.config)["rope_theta"] == 12345.0
    assert torch.isfinite(model(make_batch())["loss"])


def test_check_rope_read_names_what_would_be_misread():
    written = {"rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0}}
    with pytest.raises(ValueError, match=r"model.llm_model='x': config.json's rope_parameters .* \(it would use "
                                         r"factor=None, rope_theta=10000.0, rope_type='default'\)"):
        check_rope_read(written, LlamaConfig(), "model.llm_model='x'")
    check_rope_read({"rope_theta": 10000.0}, LlamaConfig(), "model.llm_model='x'")  # read as written: nothing to say
    check_rope_read({"hidden_size": 4096}, LlamaConfig(), "model.llm_model='x'")  # huggyllama/llama-7b names no rope


def test_a_portable_tokenizer_folder_names_a_class_both_versions_load(tmp_path):
    byte_level_tokenizer().save_pretrained(tmp_path)
    make_portable(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    text = "Question: what is it?"
    assert AutoTokenizer.from_pretrained(tmp_path)(text).input_ids == byte_level_tokenizer()(text).input_ids


def test_rank_scoring_names_the_kv_cache_as_this_transformers_prefers():
    """5.x deprecates `past_key_values` (removed in 5.40) for `cache`; 4.x knows only `past_key_values`."""
    from lavis_ademvl.models.scoring import kv_cache_argument

    assert kv_cache_argument(tiny_model().llm) == ("cache" if TRANSFORMERS_MAJOR >= 5 else "past_key_values")


def test_a_checkpoints_backbone_record_is_the_same_on_either_stack():
    """The record a checkpoint keeps of its frozen parts (tensor names and shapes, vocabulary) must not depend on the
    stack, or a checkpoint trained on one would be refused on the other: 5.x names CLIP's tensors without 4.x's
    `vision_model.`. These hashes were computed on transformers 4.55.4 and 5.25.0 alike (CI runs this on both)."""
    record = tiny_model().backbone_identity()
    assert record["llm"]["structure"] == "8b70142c8b8a9623df1aeecca64893cecbded49665b5eb925d01863886a7fd25"
    assert record["vision"]["structure"] == "24d4c459c2772347fb005dcfa3eccdfaf9d80efbf4d5dc049364dfd639d55c2d"
    assert record["tokenizer"]["vocabulary"] == "69dba20525a2aaea2cba5fe968b2f9f8475a0f9053a1fa8cf8324cfc9cb06a43"
