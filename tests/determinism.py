"""Which aten ops a computation runs (forward and backward), and which of them raise on CUDA under
`torch.use_deterministic_algorithms(True)`: a CPU-only guard for `run.deterministic` on a GPU host.

The recorder sits at the Python dispatch key, below autograd and below the decomposition of composite ops, so it
sees the backend ops (e.g. `_adaptive_avg_pool2d_backward`) that CUDA would run for the same code. Branches that
depend on the device (SDPA's kernel choice, cuDNN paths) can differ; none of them leads to an op listed here.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

from torch.utils._python_dispatch import TorchDispatchMode

# torch.use_deterministic_algorithms's docstring, "will throw a RuntimeError when mode=True", its CUDA entries, as the
# aten ops whose CUDA kernels raise: an overload packet name (every overload) or `packet.overload`. An entry that
# raises only for some arguments is listed whole (the guard then errs towards flagging).
CUDA_NONDETERMINISTIC_OPS = {
    "avg_pool3d_backward": "AvgPool3d when attempting to differentiate a CUDA tensor",
    "_adaptive_avg_pool2d_backward": "AdaptiveAvgPool2d when attempting to differentiate a CUDA tensor",
    "_adaptive_avg_pool3d_backward": "AdaptiveAvgPool3d when attempting to differentiate a CUDA tensor",
    "adaptive_max_pool2d_backward": "AdaptiveMaxPool2d when attempting to differentiate a CUDA tensor",
    "fractional_max_pool2d_backward": "FractionalMaxPool2d when attempting to differentiate a CUDA tensor",
    "fractional_max_pool3d_backward": "FractionalMaxPool3d when attempting to differentiate a CUDA tensor",
    "max_unpool2d": "MaxUnpool1d (run as max_unpool2d) and MaxUnpool2d",
    "max_unpool3d": "MaxUnpool3d",
    "upsample_linear1d_backward": "interpolate, mode linear, when attempting to differentiate a CUDA tensor",
    "upsample_bilinear2d_backward": "interpolate, mode bilinear, when attempting to differentiate a CUDA tensor",
    "_upsample_bilinear2d_aa_backward": "interpolate, mode bilinear with antialias, when differentiating a CUDA tensor",
    "upsample_bicubic2d_backward": "interpolate, mode bicubic, when attempting to differentiate a CUDA tensor",
    "_upsample_bicubic2d_aa_backward": "interpolate, mode bicubic with antialias, when differentiating a CUDA tensor",
    "upsample_trilinear3d_backward": "interpolate, mode trilinear, when attempting to differentiate a CUDA tensor",
    "reflection_pad1d_backward": "ReflectionPad1d when attempting to differentiate a CUDA tensor",
    "reflection_pad2d_backward": "ReflectionPad2d when attempting to differentiate a CUDA tensor",
    "reflection_pad3d_backward": "ReflectionPad3d when attempting to differentiate a CUDA tensor",
    # A [N, C] input runs nll_loss_forward, which has a deterministic CUDA kernel; [N, C, d1, ...] runs this one.
    "nll_loss2d_forward": "NLLLoss when called on a CUDA tensor (raises for reduction != 'none')",
    "_ctc_loss_backward": "CTCLoss when attempting to differentiate a CUDA tensor",
    # `_embedding_bag_backward` is composite: the dispatcher runs this dense kernel.
    "_embedding_bag_dense_backward": "EmbeddingBag, mode='max', when attempting to differentiate a CUDA tensor",
    "put_": "Tensor.put_ (accumulate=False; accumulate=True on a CUDA tensor)",
    "put": "Tensor.put_, through the out-of-place torch.put",
    "histc": "torch.histc when called on a CUDA tensor",
    "bincount": "torch.bincount when called on a CUDA tensor (raises when weights are given)",
    "median.dim": "torch.median with indices output when called on a CUDA tensor",
    "median.dim_values": "torch.median with indices output (out=) when called on a CUDA tensor",
    # Same CUDA kernel as median with indices (median_with_indices_impl), same alert.
    "nanmedian.dim": "torch.nanmedian with indices output when called on a CUDA tensor",
    "nanmedian.dim_values": "torch.nanmedian with indices output (out=) when called on a CUDA tensor",
    "grid_sampler_2d_backward": "grid_sample (4-D input) when attempting to differentiate a CUDA tensor",
    "grid_sampler_3d_backward": "grid_sample (5-D input) when attempting to differentiate a CUDA tensor",
    "scatter_reduce": "Tensor.scatter_reduce when called on a CUDA tensor (raises for prod, amax, amin)",
    "scatter_reduce_": "Tensor.scatter_reduce_ when called on a CUDA tensor (raises for prod, amax, amin)",
}


def op_name(func) -> str:
    """`packet.overload` of an aten op (`median.dim`; `histc` for a default overload); other namespaces qualified."""
    name = func.name()  # "aten::median.dim"
    return name.split("::", 1)[1] if func.namespace == "aten" else name


class OpRecorder(TorchDispatchMode):
    """Collects the name (`op_name`) of every op dispatched while active, in any thread autograd runs backward in."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(op_name(func))
        return func(*args, **(kwargs or {}))


def record_ops(step: Callable[[], object]) -> set[str]:
    """The op names run by `step()`, e.g. a forward, loss and backward."""
    with OpRecorder() as recorder:
        step()
    return recorder.ops


def cuda_nondeterministic(ops: Iterable[str]) -> list[str]:
    """The recorded ops that CUDA_NONDETERMINISTIC_OPS lists, by packet or by `packet.overload`, sorted."""
    return sorted(op for op in ops if op in CUDA_NONDETERMINISTIC_OPS or op.split(".")[0] in CUDA_NONDETERMINISTIC_OPS)
