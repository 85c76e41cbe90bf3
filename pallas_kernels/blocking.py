"""Lane-dense 2-D block views of pytree leaves, and the `pallas_call` they feed.

Every fused optimizer here is elementwise over a leaf, so a leaf of any shape is
flattened to 1-D and viewed as `(rows, 128)`: 128 lanes is the TPU vreg width and
a multiple of a GPU warp, so one layout serves Mosaic-TPU and Triton. The grid
walks `block_rows` rows at a time.

Remainders: the view pads the flat leaf up to a whole number of blocks and slices
back afterwards, so no grid step ever reads or writes outside an array (Triton
would not mask it; the interpreter would read NaN). Leaves whose size is already
a multiple of `128 * block_rows` (nearly every weight matrix) are viewed with a
free reshape; the others (biases of odd size, scalars) cost one copy of that
leaf only.
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

LANES = 128
# Traced scalars (learning rate, bias corrections) travel as one (8, 128) fp32
# tile, row j holding scalar j in every lane: a (1, 128) row broadcasts over a
# block on every backend, where scalar loads from vector memory do not (Mosaic).
HYPER_ROWS = 8
# Kernels that need whole-tensor sums (LAMB's norms) write one (8, 128) tile per
# grid step, row j holding partial sum j; jnp adds the tiles up afterwards.
PARTIAL_ROWS = 8


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Rows of 128 lanes that one grid step processes.

    `block_rows` must be a power of two (Triton needs power-of-two blocks; Mosaic
    needs a multiple of 8 rows for fp32 and 16 for bf16 once a leaf spans more than
    one block). A leaf smaller than one block uses a single smaller block.
    """

    block_rows: int

    def __post_init__(self):
        if self.block_rows < 1 or self.block_rows & (self.block_rows - 1):
            raise ValueError(f"block_rows={self.block_rows} is not a power of two; use e.g. 16, 512 or 1024")

    @classmethod
    def get_default(cls, *, interpret: bool, platform: str | None = None) -> "BlockSizes":
        """Large blocks for the interpreter (few loop steps), VMEM-sized for TPU, register-sized for Triton.

        `platform`: the one compiled for (a mesh's `devices.flat[0].platform`); None: the default backend.
        """
        if interpret:
            return cls(block_rows=1024)
        platform = platform or jax.default_backend()
        if platform == "tpu":
            # 512 x 128 x 4 B = 256 KiB per buffer; ~9 double-buffered buffers fit v5e's 16 MiB scoped VMEM.
            return cls(block_rows=512)
        # Triton keeps a block in registers: 2048 elements over 4 warps is 16 per thread.
        return cls(block_rows=16)


def resolve_interpret(interpret: bool | None, *, platform: str | None = None) -> bool:
    """None means: interpret on CPU (Pallas has no CPU lowering), compile on GPU/TPU. `platform`: the one
    compiled for (an AOT compile for a TPU traces on a CPU host); None: the default backend."""
    if interpret is not None:
        return interpret
    return (platform or jax.default_backend()) == "cpu"


@dataclasses.dataclass(frozen=True)
class BlockView:
    """How a leaf of `size` elements is laid out as `(rows, 128)` blocks of `block_rows` rows."""

    size: int
    rows: int
    block_rows: int

    @classmethod
    def of(cls, size: int, block_sizes: BlockSizes) -> "BlockView":
        rows = pl.cdiv(size, LANES)
        # A small leaf gets one block of the next power of two rows, not a mostly-padding full block.
        block_rows = min(block_sizes.block_rows, pl.next_power_of_2(rows))
        return cls(size=size, rows=pl.cdiv(rows, block_rows) * block_rows, block_rows=block_rows)

    @property
    def grid(self) -> int:
        return self.rows // self.block_rows

    @property
    def padded(self) -> bool:
        return self.rows * LANES != self.size

    def to_blocks(self, x: jax.Array) -> jax.Array:
        flat = x.reshape(-1)  # (size,)
        if self.padded:
            flat = jnp.pad(flat, (0, self.rows * LANES - self.size))  # zeros: inert in every update rule here
        return flat.reshape(self.rows, LANES)  # (rows, 128)

    def from_blocks(self, y: jax.Array, shape: Sequence[int]) -> jax.Array:
        flat = y.reshape(-1)  # (rows * 128,)
        if self.padded:
            flat = flat[: self.size]
        return flat.reshape(shape)

    def valid_mask(self) -> jax.Array:
        """Inside a kernel: True for the block's elements that belong to the leaf (not padding)."""
        row = jax.lax.broadcasted_iota(jnp.int32, (self.block_rows, LANES), 0)
        lane = jax.lax.broadcasted_iota(jnp.int32, (self.block_rows, LANES), 1)
        first_row = pl.program_id(0) * self.block_rows
        return (first_row + row) * LANES + lane < self.size


def hyper_tile(*scalars: jax.Array | float) -> jax.Array:
    """Pack up to 8 traced scalars into the (8, 128) fp32 tile kernels read with `hyper_ref[j:j+1, :]`."""
    if len(scalars) > HYPER_ROWS:
        raise ValueError(f"at most {HYPER_ROWS} hyperparameters fit one tile, got {len(scalars)}")
    column = jnp.stack([jnp.asarray(s, jnp.float32) for s in scalars])  # (k,)
    column = jnp.pad(column, (0, HYPER_ROWS - len(scalars)))  # (8,)
    return jnp.broadcast_to(column[:, None], (HYPER_ROWS, LANES))  # (8, 128)


def partial_sums_tile(*sums: jax.Array) -> jax.Array:
    """Inside a kernel: an (1, 8, 128) tile whose row j holds the scalar `sums[j]` in every lane."""
    sublane = jax.lax.broadcasted_iota(jnp.int32, (PARTIAL_ROWS, LANES), 0)
    tile = jnp.zeros((PARTIAL_ROWS, LANES), jnp.float32)
    for j, s in enumerate(sums):
        tile = jnp.where(sublane == j, s, tile)
    return tile[None]  # (1, 8, 128)


def block_sum(x: jax.Array) -> jax.Array:
    """Inside a kernel: the sum of a (block_rows, 128) block as a (1, 1) array (two reductions lower everywhere)."""
    return jnp.sum(jnp.sum(x, axis=0, keepdims=True), axis=1, keepdims=True)


def blockwise_call(
    kernel: Callable[..., None],
    hyper: jax.Array,
    inputs: Sequence[jax.Array],
    *,
    view: BlockView,
    out_dtypes: Sequence[jnp.dtype],
    input_output_aliases: dict[int, int],
    num_partial_sums: int = 0,
    interpret: bool,
    name: str,
) -> list[jax.Array]:
    """One `pallas_call` over `view.grid` blocks: kernel(hyper_ref, *in_refs, *out_refs).

    inputs: (rows, 128) arrays of `view`; outputs likewise, one per `out_dtypes`, plus a
    (grid, 8, 128) fp32 array of partial sums when `num_partial_sums` > 0.
    `input_output_aliases` maps an index in `inputs` to an index in the outputs, so a
    moment can be rewritten in place when its buffer is donated.
    """
    block = pl.BlockSpec((view.block_rows, LANES), lambda i: (i, 0))
    in_specs = [pl.BlockSpec((HYPER_ROWS, LANES), lambda i: (0, 0))] + [block] * len(inputs)
    out_specs = [block] * len(out_dtypes)
    out_shape = [jax.ShapeDtypeStruct((view.rows, LANES), dtype) for dtype in out_dtypes]
    if num_partial_sums:
        out_specs.append(pl.BlockSpec((1, PARTIAL_ROWS, LANES), lambda i: (i, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((view.grid, PARTIAL_ROWS, LANES), jnp.float32))
    aliases = {i + 1: o for i, o in input_output_aliases.items()}  # +1: hyper is input 0

    def call(compiler_params, *args):
        return pl.pallas_call(
            kernel,
            grid=(view.grid,),
            in_specs=in_specs,
            out_specs=out_specs,
            out_shape=out_shape,
            input_output_aliases=aliases,
            compiler_params=compiler_params,
            interpret=interpret,
            name=name,
        )(*args)

    if interpret:
        return call(None, hyper, *inputs)
    # Compiler parameters are backend-specific types, so pick them per lowering platform:
    # one traced function then AOT-compiles for TPU (Mosaic) and CUDA/ROCm (Triton).
    # jax 0.10.2 sends plain GPU pallas_calls to Mosaic-GPU; Triton params select Triton.
    triton = functools.partial(call, pltriton.CompilerParams(num_warps=4))
    return jax.lax.platform_dependent(
        hyper,
        *inputs,
        tpu=functools.partial(call, pltpu.CompilerParams(dimension_semantics=("parallel",))),
        cuda=triton,
        rocm=triton,
    )
