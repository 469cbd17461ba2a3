"""Kernel sources and their compilation for the backend at hand (Metal or CUDA).

Each `<kernel>.metal` file in this folder is the BODY of one kernel as `mx.fast.metal_kernel` takes it:
MLX writes the signature (one pointer per input and output, `<input>_shape` where the body uses it,
the thread-position attributes the body mentions, the template arguments). `dsv4_compat.h` and
`dsv4_formats.h` are prepended as the kernel's header. On NVIDIA the same text goes to
`mx.fast.cuda_kernel`, whose generated signature has the same names; `dsv4_compat.h` maps the Metal
builtins onto CUDA's. So every kernel has exactly one source, whichever GPU runs it.

What MLX receives is that source compacted for the GPU at hand (`kernel_source`): the other back-end's
branch of the portability layer, comments, indentation and blank lines removed. MLX's CUDA back-end hashes
a custom kernel's whole generated source at every launch it encodes (measured with a native profiler:
a tenth of a decode step's host time), so the text's length is paid on every decode step.
`DSV4_KERNEL_SOURCE=full` hands over the files as written (compile errors then point at their lines).
"""

from __future__ import annotations

import functools
import os
import re
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
    "swiglu": KernelInterface(("gate", "up", "w", "gate2", "params", "meta"), ("out",)),
    "compressor_emit": KernelInterface(("kv", "gate", "nw", "freqs", "params", "meta"), ("codes", "scales", "rope")),
    "window_write": KernelInterface(("ring", "ring_pos", "row", "meta"), ("out", "out_pos")),
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


_BACKEND_IF = re.compile(r"#\s*if\s+defined\s*\(\s*__METAL_VERSION__\s*\)|#\s*ifdef\s+__METAL_VERSION__")
# A string literal is kept whole (it could hold "//"); a comment is what the other alternatives match.
_LITERAL_OR_COMMENT = re.compile(r'"(?:\\.|[^"\\\n])*"|//[^\n]*|/\*.*?\*/', re.DOTALL)


def backend_branch(text: str, gpu: str) -> str:
    """`text` with each `#if defined(__METAL_VERSION__)` ... `#else` ... `#endif` resolved for `gpu`
    ('metal' keeps the first branch, 'cuda' the second); other conditionals are left to the compiler."""
    out, stack = [], []  # stack: per open conditional, None (not ours) or whether its current branch is kept
    for line in text.splitlines():
        directive = line.strip()
        if _BACKEND_IF.match(directive):
            stack.append(gpu == "metal")
            continue
        if directive.startswith("#if"):
            stack.append(None)
        elif stack and stack[-1] is not None and re.match(r"#\s*else\b", directive):
            stack[-1] = not stack[-1]
            continue
        elif re.match(r"#\s*endif\b", directive):
            if not stack:
                raise ValueError("unbalanced #if / #endif in a kernel source")
            if stack.pop() is not None:  # the #endif of a back-end conditional: resolved, dropped
                continue
        if all(keep is not False for keep in stack):
            out.append(line)
    if stack:
        raise ValueError("unbalanced #if / #endif in a kernel source")
    return "\n".join(out) + "\n"


def compact(text: str) -> str:
    """`text` without comments, indentation, repeated spaces and blank lines; lines stay lines (the
    preprocessor needs them) and string literals stay as written."""
    text = _LITERAL_OR_COMMENT.sub(lambda m: m.group(0) if m.group(0).startswith('"') else " ", text)
    lines = (re.sub(r"[ \t]+", " ", line).strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line) + "\n"


def full_sources() -> bool:
    """DSV4_KERNEL_SOURCE=full: hand MLX the files as written."""
    return os.environ.get("DSV4_KERNEL_SOURCE", "") == "full"


def _header_items(text: str) -> list[tuple[str, str]]:
    """(name, text) of each top-level definition of a compacted header: a one-line `#define` or a
    `DSV4_FN` function (its lines up to the closing brace)."""
    items, lines, depth = [], [], 0
    for line in text.splitlines():
        lines.append(line)
        depth += line.count("{") - line.count("}")
        if depth == 0:
            item = "\n".join(lines)
            define = re.match(r"#\s*define\s+(\w+)", item)
            function = re.match(r"DSV4_FN\b[^(]*?(\w+)\s*\(", item)
            if not (define or function):
                raise ValueError(f"kernel header: not a #define or DSV4_FN function: {item[:80]!r}")
            items.append(((define or function).group(1), item))
            lines = []
    return items


def used_definitions(header_text: str, body_text: str) -> str:
    """The definitions of `header_text` that `body_text` uses, directly or through other definitions
    (in their order)."""
    items = _header_items(header_text)
    words = set(re.findall(r"\w+", body_text))
    kept: set[int] = set()
    while True:
        new = {i for i, (name, _) in enumerate(items) if i not in kept and name in words}
        if not new:
            break
        kept |= new
        for i in new:
            words |= set(re.findall(r"\w+", items[i][1]))
    return "".join(items[i][1] + "\n" for i in sorted(kept))


@functools.cache
def kernel_source(kernel: str, gpu: str, full: bool = False) -> tuple[str, str]:
    """(header, body) of `kernel` as MLX gets them for back-end `gpu`: unless `full`, the header is the
    definitions the body uses, for that back-end, and both are compacted."""
    if full:
        return header(), body(kernel)
    source = compact(body(kernel))
    return used_definitions(compact(backend_branch(header(), gpu)), source), source


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
def compiled(kernel: str, gpu: str, full: bool = False) -> Callable:
    """The MLX kernel object for `kernel` on back-end `gpu` (compiled lazily per template by MLX);
    `full`: from the files as written (see `kernel_source`)."""
    interface = KERNELS[kernel]
    head, source = kernel_source(kernel, gpu, full)
    common = {"name": f"dsv4_{kernel}", "input_names": list(interface.inputs),
              "output_names": list(interface.outputs), "source": source, "header": head,
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
        return compiled(self.kernel, gpu, full_sources())(
            inputs=self.inputs, template=self.template, grid=self.grid, threadgroup=self.threadgroup,
            output_shapes=[tuple(s) for s in self.output_shapes], output_dtypes=self.output_dtypes)
