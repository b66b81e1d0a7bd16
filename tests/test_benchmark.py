"""The benchmark: its spread statistics against a direct restatement, the repeat plan, the machine record, a run on
the tiny shape with both arithmetic paths, and --compare over two trees (figures are printed, never asserted)."""
from __future__ import annotations

import json
import math
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from benchmarks import fusion_speed, machine, spread

CHECKOUT = Path(__file__).resolve().parent.parent


def test_spread_matches_a_direct_restatement():
    """Median, quartiles (numpy's linear interpolation), range, and the 95% interval of the median from order
    statistics: the ranks k, n+1-k with the largest k such that P(Binomial(n, 1/2) <= k-1) <= 2.5%."""
    rng = random.Random(0)
    for count in range(1, 41):
        values = [rng.lognormvariate(0, 0.1) for _ in range(count)]
        summary = spread.spread(values)
        ordered = sorted(values)
        assert summary["median"] == pytest.approx(np.median(values))
        assert summary["q1"] == pytest.approx(np.percentile(values, 25))
        assert summary["q3"] == pytest.approx(np.percentile(values, 75))
        assert (summary["min"], summary["max"], summary["repeats"]) == (ordered[0], ordered[-1], count)
        ks = [k for k in range(1, count // 2 + 1) if sum(math.comb(count, i) for i in range(k)) / 2**count <= 0.025]
        if not ks:
            assert summary["ci95"] is None and summary["half_width"] is None and not spread.within(summary, 1.0)
            continue
        low, high = ordered[max(ks) - 1], ordered[count - max(ks)]
        assert summary["ci95"] == (low, high)
        assert summary["half_width"] == pytest.approx(max(summary["median"] - low, high - summary["median"]) / summary["median"])
    # Known values: no 95% interval below 6 repeats; 6 -> the range; 9 -> 2nd to 8th; 20 -> 6th to 15th.
    assert [spread.median_interval_ranks(n) for n in (5, 6, 9, 20)] == [None, (1, 6), (2, 8), (6, 15)]


def test_a_ratio_is_taken_within_each_repeat():
    """Per repeat, not a ratio of medians: a slow repeat slows both timings of its ratio alike."""
    adem, none = [2.0, 4.0, 2.2], [1.0, 2.0, 1.0]
    assert spread.per_repeat_ratio(adem, none) == [2.0, 2.0, 2.2]
    samples = {"a": {"float32 train adem": adem, "float32 train none": none}}
    name = "float32: train adem/none"
    specs = {name: fusion_speed.ratio_specs(["a"], ["float32"], ["none", "adem"])[name]}
    assert fusion_speed.ratio_values(samples, specs) == {name: [2.0, 2.0, 2.2]}
    with pytest.raises(ValueError):
        spread.per_repeat_ratio([1.0], [1.0, 2.0])


def test_ratio_names_and_directions():
    """Step-time ratios are numerator/denominator in time; tokens/s ratios the inverse quotient of times; with two
    trees each step of the first is set against the second's, and each path against the first path."""
    specs = fusion_speed.ratio_specs(["main", "old"], ["float32", "bfloat16"], ["llm", "none", "adem", "prefix"])
    assert specs["main float32: train adem/llm"] == (("main", "float32 train adem"), ("main", "float32 train llm"))
    assert specs["old bfloat16: generate tokens/s adem/none"] == (("old", "bfloat16 generate none"),
                                                                   ("old", "bfloat16 generate adem"))
    assert specs["main bfloat16/float32: train adem"] == (("main", "bfloat16 train adem"), ("main", "float32 train adem"))
    assert specs["main/old float32: train prefix"] == (("main", "float32 train prefix"), ("old", "float32 train prefix"))
    assert specs["main/old bfloat16: generate tokens/s adem"] == (("old", "bfloat16 generate adem"),
                                                                   ("main", "bfloat16 generate adem"))
    assert "main/old float32: generate tokens/s llm" not in specs  # the bare LLM is not generated with


class FakeSession:
    """Times from a function of (label, key, call number); records the order it was asked in."""

    def __init__(self, label: str, seconds, calls: list):
        self.label, self.keys, self.info = label, ["float32 train none", "float32 train adem"], {}
        self.seconds, self.calls = seconds, calls

    def time(self, key: str) -> float:
        self.calls.append((self.label, key))
        return self.seconds(self.label, key, len(self.calls))


def test_repeats_interleave_rotate_and_stop_at_the_target():
    calls: list = []
    steady = [FakeSession(label, lambda label, key, n: 2.0 if "adem" in key else 1.0, calls) for label in ("a", "b")]
    specs = {name: spec for name, spec in fusion_speed.ratio_specs(["a", "b"], ["float32"], ["none", "adem"]).items()
             if "generate" not in name}  # these sessions time training steps only
    samples = fusion_speed.measure(steady, specs, fusion_speed.Plan(repeats=6, max_repeats=20, target=0.02))
    assert len(samples["a"]["float32 train adem"]) == 6  # every ratio exact: the minimum is enough
    # Each step on each tree in turn; which step and which tree go first rotate from repeat to repeat.
    assert calls[:8] == [("a", "float32 train none"), ("b", "float32 train none"), ("a", "float32 train adem"),
                         ("b", "float32 train adem"), ("b", "float32 train adem"), ("a", "float32 train adem"),
                         ("b", "float32 train none"), ("a", "float32 train none")]
    # A ratio that swings by 50% from repeat to repeat never settles within +-2%: the cap ends it, and says so.
    noisy = [FakeSession(label, lambda label, key, n: 1.0 + 0.5 * (n % 3 == 0), []) for label in ("a", "b")]
    plan = fusion_speed.Plan(repeats=6, max_repeats=9, target=0.02)
    samples = fusion_speed.measure(noisy, specs, plan)
    assert len(samples["b"]["float32 train none"]) == 9
    assert not plan.settled(fusion_speed.ratio_values(samples, specs))
    assert fusion_speed.Plan(repeats=6, max_repeats=9, target=0).settled(fusion_speed.ratio_values(samples, specs))


def test_labelled_columns_on_either_api():
    """The bare-LLM step keeps the labelled columns' logits whether the batch carries their count (today) or only its
    labels (11b3933, a --compare baseline)."""
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, 8, 9]])
    old = type("Encoded", (), {"labels": labels})()
    assert fusion_speed.labelled_columns(old) == 3
    assert fusion_speed.labelled_columns(type("Encoded", (), {"labels": labels[:, :1]})()) == 0
    assert fusion_speed.labelled_columns(type("Encoded", (), {"labels": labels, "labelled_columns": 2})()) == 2


INTEL = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\n"
         "flags\t\t: fpu avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile\n")
AMD = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2 fma\nprocessor\t: 1\nmodel name\t: other\n"


def test_cpu_kind_and_arithmetic_path():
    intel, amd = machine.cpu_kind(INTEL), machine.cpu_kind(AMD)
    assert intel["model"] == "Intel(R) Xeon(R) Platinum 8481C"
    assert intel["flags"] == ["avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"]
    assert (amd["model"], amd["flags"]) == ("AMD EPYC 7B13", ["avx2", "fma"])  # the first processor's
    cpu = torch.device("cpu")
    assert machine.arithmetic_path("bfloat16", cpu, intel) == "bfloat16 autocast, native (avx512_bf16, amx_bf16)"
    assert machine.arithmetic_path("bfloat16", cpu, amd) == "bfloat16 autocast, emulated (no avx512_bf16 or amx_bf16)"
    assert machine.arithmetic_path("float32", cpu, amd) == "float32"


def test_fusion_speed_tiny_on_both_paths_records_the_machine(tmp_path, capsys):
    threads = torch.get_num_threads()
    argv = ["--shape", "tiny", "--dtypes", "float32,bfloat16", "--threads", "1", "--repeats", "2", "--target-spread", "0",
            "--new-tokens", "4", "--out", str(tmp_path)]
    assert fusion_speed.main(argv) == 0
    assert torch.get_num_threads() == threads  # pinned for the run only
    result = json.loads((tmp_path / "fusion_speed_tiny_cpu_float32-bfloat16.json").read_text())
    (tree,) = result["trees"].values()
    assert set(tree["paths"]) == {"float32", "bfloat16"}
    path = tree["paths"]["float32"]
    assert set(path["train_step_s"]) == {"llm", "none", "adem", "prefix"}
    assert set(path["generate"]) == {"none", "adem", "prefix"}
    # <bos> text </eos>; adem adds "Image: " (3 tokens, as under SmolLM2's tokenizer) and the [cls] slot.
    sequence = path["sequence_tokens"]
    assert sequence["none"] == result["text_tokens"] + 2
    assert sequence["adem"] == sequence["none"] + 4
    assert sequence["prefix"] == sequence["none"] + 3 + result["visual_tokens_prefix"]
    assert all(path["memory_bytes"][name] > 0 for name in path["train_step_s"])
    # Operation counts: the fusion adds work to every layer of the LLM; the ratio is theirs.
    operations = path["operations"]
    assert operations["train llm"] < operations["train none"] < operations["train adem"]
    assert operations["generate none"] < operations["generate adem"]
    assert result["deterministic"]["float32: operations train adem/llm"] == operations["train adem"] / operations["train llm"]
    flops = result["flops_one_token_at_256"]
    assert flops["none"] < flops["adem"] < flops["prefix"]
    # Each ratio per repeat, its median among them; tokens/s from the median seconds.
    samples = result["samples_s"]["checkout"]
    assert len(samples["bfloat16 train adem"]) == result["repeats"] == 2
    ratio = result["ratios"]["bfloat16/float32: train adem"]
    assert ratio["median"] == pytest.approx(np.median(np.divide(samples["bfloat16 train adem"], samples["float32 train adem"])))
    assert path["generate"]["adem"]["tokens_per_s"] == pytest.approx(2 * 4 / np.median(samples["float32 generate adem"]))
    assert ratio["ci95"] is None and result["target_reached"] is None  # 2 repeats: no interval, no target asked
    # The machine: the CPU kind as /proc/cpuinfo names it, its bfloat16 path, threads, versions, the revision.
    record = result["machine"]
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next(line.partition(":")[2].strip() for line in cpuinfo.splitlines() if line.startswith("model name"))
    flags = set(next(line.partition(":")[2] for line in cpuinfo.splitlines() if line.startswith("flags")).split())
    assert record["cpu"]["model"] == model
    assert set(record["cpu"]["flags"]) == flags & set(machine.RELEVANT_FLAGS)
    native = flags & {"avx512_bf16", "amx_bf16"}
    assert ("native" if native else "emulated") in tree["paths"]["bfloat16"]["arithmetic"]
    assert (record["threads"], record["torch"], record["transformers"]) == (1, torch.__version__, transformers.__version__)
    head = subprocess.run(["git", "-C", str(CHECKOUT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert tree["revision"]["rev"] == head and tree["lavis_ademvl"] == str(CHECKOUT / "lavis_ademvl")
    out = capsys.readouterr().out
    assert model in out and "| adem |" in out and "| bfloat16/float32: train adem |" in out


def test_compare_times_two_trees_each_with_its_own_model_code(tmp_path):
    """--compare HEAD: the checkout and HEAD (exported) each in a process of its own, threads pinned there, every
    step on both, and the between-tree ratios per repeat. The export is gone afterwards."""
    argv = ["--shape", "tiny", "--variants", "none,adem", "--threads", "1", "--repeats", "2", "--target-spread", "0",
            "--new-tokens", "2", "--padded", "--compare", "HEAD", "--out", str(tmp_path)]
    assert fusion_speed.main(argv) == 0
    result = json.loads((tmp_path / "fusion_speed_tiny_cpu_padded_vs_HEAD.json").read_text())
    assert list(result["trees"]) == ["checkout", "HEAD"] and result["padded"]
    checkout, head = result["trees"]["checkout"], result["trees"]["HEAD"]
    assert checkout["lavis_ademvl"] == str(CHECKOUT / "lavis_ademvl")
    exported = Path(head["lavis_ademvl"])
    assert exported.name == "lavis_ademvl" and CHECKOUT not in exported.parents and not exported.exists()
    commit = subprocess.run(["git", "-C", str(CHECKOUT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert head["revision"] == {"rev": commit, "dirty": False} and checkout["revision"]["rev"] == commit
    for tree in (checkout, head):
        assert tree["machine"]["threads"] == 1 and tree["machine"]["thread_env"]["OMP_NUM_THREADS"] == "1"
    for variant in ("none", "adem"):
        for kind in ("train", "generate tokens/s"):
            ratio = result["ratios"][f"checkout/HEAD float32: {kind} {variant}"]
            assert ratio["repeats"] == 2 and ratio["median"] > 0
    train = result["samples_s"]
    assert result["ratios"]["checkout/HEAD float32: train adem"]["median"] == pytest.approx(
        np.median(np.divide(train["checkout"]["float32 train adem"], train["HEAD"]["float32 train adem"])))
    memory = result["deterministic"]["checkout/HEAD float32: memory adem"]
    assert memory == checkout["paths"]["float32"]["memory_bytes"]["adem"] / head["paths"]["float32"]["memory_bytes"]["adem"]
    # The same model code in both trees (a clean checkout): every step dispatches the same operations.
    if not checkout["revision"]["dirty"]:
        assert checkout["paths"]["float32"]["operations"] == head["paths"]["float32"]["operations"]
    assert result["deterministic"]["checkout/HEAD float32: operations generate adem"] == (
        checkout["paths"]["float32"]["operations"]["generate adem"] / head["paths"]["float32"]["operations"]["generate adem"])


def test_operation_count_is_the_number_of_kernel_calls_forward_and_backward():
    """A restatement: n additions are n operations; a backward through them adds its own, counted too."""
    x = torch.ones(3, requires_grad=True)

    def additions(n: int) -> torch.Tensor:
        out = x
        for _ in range(n):
            out = out + 1
        return out

    assert fusion_speed.dispatched_operations(lambda: additions(5)) == 5
    forward = fusion_speed.dispatched_operations(lambda: additions(5).sum())
    both = fusion_speed.dispatched_operations(lambda: additions(5).sum().backward())
    assert forward == 6 and both > forward


def test_padded_batch_is_left_padded():
    """--padded: one prompt a quarter shorter, so the model's batch is left-padded and the fusion's padding path runs."""
    shape, cpu = fusion_speed.SHAPES["tiny"], torch.device("cpu")
    _, models = fusion_speed.build_variants(shape, cpu, ["adem"])
    tokenizer = models["adem"].tokenizer
    encoded = models["adem"].encode_batch(fusion_speed.make_batch(shape, tokenizer, cpu, padded=True), with_answer=True)
    lengths = encoded.attention_mask.sum(dim=1).tolist()
    assert encoded.padded and encoded.attention_mask[0, 0] == 0
    assert lengths[1:] == [encoded.input_ids.shape[1]] * (shape.batch - 1) and lengths[0] == lengths[1] - shape.text_tokens // 4
    assert not models["adem"].encode_batch(fusion_speed.make_batch(shape, tokenizer, cpu, padded=False), with_answer=True).padded


def test_llama7b_towers_are_built_where_they_run_in_bfloat16():
    """Off the CPU the LLaMA-7B shape is built on its device in bfloat16 from the start, never as 28 GB of float32 on
    the host: on the meta device (no memory at all) every frozen weight is a bfloat16 meta tensor, the trainable ones
    stay float32, and the default dtype is restored."""
    llm, variants = fusion_speed.build_variants(fusion_speed.SHAPES["llama7b"], torch.device("meta"))
    frozen = [llm, *(model.vision_tower for model in variants.values() if model.vision_tower is not None)]
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for tower in frozen for p in tower.parameters())
    assert sum(p.numel() for p in llm.parameters()) > 6.7e9
    assert all(p.dtype == torch.float32 for p in variants["adem"].parameters() if p.requires_grad)
    assert torch.get_default_dtype() == torch.float32
