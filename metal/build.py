"""Kernel sources and their compilation for the backend at hand (Metal or CUDA).

Each `<kernel>.metal` file in this folder is the BODY of one kernel as `mx.fast.metal_kernel` takes it:
MLX writes the signature (one pointer per input and output, `<input>_shape` where the body uses it,
the thread-position attributes the body mentions, the template arguments). `dsv4_compat.h` and
`dsv4_formats.h` are prepended as the kernel's header. On NVIDIA the same text goes to
`mx.fast.cuda_kernel`, whose generated signature has the same names; `dsv4_compat.h` maps the Metal
builtins onto CUDA's. So every kernel has exactly one source, whichever GPU runs it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources

import mlx.core as mx

HEADERS = ("dsv4_compat.h", "dsv4_formats.h")


@dataclass(frozen=True)
class KernelInterface:
    """The argument names of one kernel, in the order MLX passes them."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


KERNELS: dict[str, KernelInterface] = {
    "sparse_attention": KernelInterface(
        ("q", "wkv", "wpos", "codes", "scales", "rope", "sel", "positions", "sink", "scale", "meta"),
        ("out", "part", "ml")),
    "attention_combine": KernelInterface(("part", "ml", "sink", "cs", "sn"), ("out",)),
    "indexer_scores": KernelInterface(("q", "w", "packed", "kscales", "kdense", "positions", "meta"), ("scores",)),
    "topk_select": KernelInterface(("scores", "positions", "meta"), ("idx",)),
    "hc_pre": KernelInterface(("x", "fn", "base", "scale", "params", "mixes", "norm_w"), ("y", "post", "comb")),
    "hc_post": KernelInterface(("out", "x", "post", "comb", "extra"), ("new_x",)),
    "rope_rows": KernelInterface(("x", "cs", "sn", "nw", "params", "meta"), ("y",)),
    "decode_gemv": KernelInterface(("x", "wa", "wb", "add_b", "buf_a", "buf_b", "meta", "scale"), ("out_a", "out_b")),
    "moe_route": KernelInterface(("mix", "bias", "params"), ("ids", "weights")),
    "swiglu": KernelInterface(("gate", "up", "w", "params", "meta"), ("out",)),
    "compressor_emit": KernelInterface(("kv", "gate", "nw", "freqs", "params", "meta"), ("codes", "scales", "rope")),
}


def read_source(filename: str) -> str:
    return resources.files(__package__).joinpath(filename).read_text(encoding="utf-8")


def source_files() -> list:
    """The kernel sources and headers shipped in this package."""
    return [p for p in resources.files(__package__).iterdir() if p.name.endswith((".metal", ".h"))]


def header() -> str:
    return "\n".join(read_source(name) for name in HEADERS)


def body(kernel: str) -> str:
    return read_source(f"{kernel}.metal")


@functools.cache
def backend() -> str | None:
    """'metal' or 'cuda' when MLX has that GPU back-end here, else None (asked once: a process's
    back-ends do not change, and every layer of every decode step asks)."""
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return None


@functools.cache
def compiled(kernel: str, gpu: str) -> Callable:
    """The MLX kernel object for `kernel` on back-end `gpu` (compiled lazily per template by MLX)."""
    interface = KERNELS[kernel]
    common = {"name": f"dsv4_{kernel}", "input_names": list(interface.inputs),
              "output_names": list(interface.outputs), "source": body(kernel), "header": header(),
              "ensure_row_contiguous": True}
    if gpu == "metal":
        return mx.fast.metal_kernel(**common)
    if gpu == "cuda":
        return mx.fast.cuda_kernel(**common)
    raise ValueError(f"no GPU kernel back-end named {gpu!r}")


TemplateArg = tuple[str, "int | bool | mx.Dtype"]


@dataclass
class Launch:
    """One kernel dispatch, fully described (the syntax tests read `template` and the input dtypes)."""

    kernel: str
    inputs: list[mx.array]
    template: list[TemplateArg]
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    output_shapes: list[Sequence[int]]
    output_dtypes: list[mx.Dtype]

    def __post_init__(self) -> None:
        interface = KERNELS[self.kernel]
        if len(self.inputs) != len(interface.inputs) or len(self.output_shapes) != len(interface.outputs):
            raise ValueError(f"{self.kernel}: expected {len(interface.inputs)} inputs and "
                             f"{len(interface.outputs)} outputs")

    def run(self, gpu: str | None = None) -> list[mx.array]:
        gpu = gpu or backend()
        if gpu is None:
            raise RuntimeError("no Metal or CUDA back-end: the kernels need a GPU")
        return compiled(self.kernel, gpu)(
            inputs=self.inputs, template=self.template, grid=self.grid, threadgroup=self.threadgroup,
            output_shapes=[tuple(s) for s in self.output_shapes], output_dtypes=self.output_dtypes)
