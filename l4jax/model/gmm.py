"""Grouped matrix multiply for sparse MoE: rows sorted by group, each group multiplied by its own matrix.

``gmm(x [M, K], w [G, K, N], sizes [G])`` computes ``x[rows of g] @ w[g]`` for every group g. Three backends:

- ``"scan"`` (default, runs everywhere): the megablox schedule in plain XLA. The rows are cut into tiles of
  ``tile`` rows; a ``lax.scan`` of ``M/tile + G - 1`` steps visits every (tile, group) pair that overlaps, and the
  steps left over (when fewer pairs overlap) compute a masked tile that adds zeros. No ``lax.cond``: on a GPU each
  one would read its predicate on the host, a device sync per visit. Work is ~(M + G*tile) * K * N, proportional to
  tokens x top-k, not to tokens x experts. A custom VJP runs the backward pass on the same schedule
  (``dx = gmm(dy, w^T)``, ``dw[g] = x_g^T dy_g``), so no per-step copy of an expert matrix is kept for autodiff.
- ``"ragged_dot"``: ``jax.lax.ragged_dot``. Native and sparse on TPU; on XLA:CPU it lowers to a dense matmul over
  every group (G times the work), and on GPUs too (the compiled program expands x to [M, G, K]).
- ``"mgpu"``: Pallas' Mosaic GPU kernels for Hopper (wgmma, bulk tensor copies): ``ragged_dot_mgpu`` for y = x w
  and dx = dy w^T, ``transposed_ragged_dot_mgpu`` for dw = x^T dy. Measured on an H200 at the ``bench`` shapes
  (M = 8192, K = N = 2048, G = 16): 236 TFLOP/s forward against the tile schedule's 35 (docs/performance.md).
  The kernels write only the rows of the groups, so rows past sum(sizes) are zeroed here, and so is an empty
  group's dw. Shapes the kernels do not take (K or N not a multiple of 128, other dtypes than bf16 / f16) run on
  the tile schedule.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu

from .quant import QArray, take

IMPLS = ("scan", "ragged_dot", "mgpu")
# The Mosaic GPU kernels' blocks: the fastest of those tried on an H200 at the bench shapes (bench/kernels.py).
MGPU_BLOCKS = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4)
MGPU_DTYPES = ("bfloat16", "float16")


def gmm(x: jax.Array, w: jax.Array | QArray, sizes: jax.Array, *, impl: str = "scan", tile: int = 128
        ) -> jax.Array:
    """x [M, K] rows sorted by group; w [G, K, N]; sizes [G] int with sum <= M -> [M, N] (rows past sum are 0).

    A quantized w (``quant.QArray``, inference) goes through the tile schedule, each visit dequantizing only its
    group's weight (never the whole stack), except for ``ragged_dot`` (TPU), which takes the dequantized stack."""
    if isinstance(w, QArray):
        if impl == "ragged_dot":
            return gmm(x, w.dequantize(x.dtype), sizes, impl=impl, tile=tile)
        if impl not in IMPLS:
            raise ValueError(f"unknown gmm impl {impl!r}; expected one of {IMPLS}")
        tile = max(8, min(tile, -(-x.shape[0] // 8) * 8))
        return _gmm_impl(jnp.asarray(x), w, jnp.asarray(sizes).astype(jnp.int32), tile)
    x, w, sizes = jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes)
    if impl == "ragged_dot":
        return jax.lax.ragged_dot(x, w, sizes.astype(jnp.int32),
                                  preferred_element_type=jnp.float32).astype(jnp.result_type(x, w))
    if impl not in IMPLS:
        raise ValueError(f"unknown gmm impl {impl!r}; expected one of {IMPLS}")
    if impl == "mgpu" and mgpu_fits(x, w):
        return _gmm_mgpu(x, w, sizes.astype(jnp.int32))
    tile = max(8, min(tile, -(-x.shape[0] // 8) * 8))
    return _gmm(x, w, sizes.astype(jnp.int32), tile)


def mgpu_fits(x: jax.Array, w: jax.Array) -> bool:
    """Whether the Mosaic GPU kernels take these shapes: K and N multiples of 128 (the transposed product for dw
    tiles both), one 16-bit float dtype."""
    K, N = w.shape[1], w.shape[2]
    return (K % 128 == 0 and N % 128 == 0 and x.dtype == w.dtype and x.dtype.name in MGPU_DTYPES
            and x.shape[0] > 0)


def _schedule(sizes: jax.Array, num_tiles: int, tile: int):
    """The (group, tile) pairs to visit, in row order. Returns per-visit group, tile, valid, plus group bounds."""
    G = sizes.shape[0]
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    first = starts // tile
    count = jnp.where(sizes > 0, (ends - 1) // tile - first + 1, 0)
    visit_end = jnp.cumsum(count)
    visits = jnp.arange(num_tiles + G - 1)
    group = jnp.minimum(jnp.searchsorted(visit_end, visits, side="right"), G - 1)
    tile_id = first[group] + visits - (visit_end - count)[group]
    valid = visits < visit_end[-1]
    return group, jnp.where(valid, tile_id, 0), valid, starts, ends


def _tiles(x: jax.Array, tile: int) -> tuple[jax.Array, int]:
    pad = -x.shape[0] % tile
    return jnp.pad(x, ((0, pad), (0, 0))), (x.shape[0] + pad) // tile


def _row_mask(t, g, ok, starts, ends, tile):
    """[tile] bool: the rows of tile t that belong to group g; none when the visit is not a real one (``ok``)."""
    rows = t * tile + jnp.arange(tile)
    return (rows >= starts[g]) & (rows < ends[g]) & ok


def _gmm_impl(x, w, sizes, tile, transpose_w=False):
    M = x.shape[0]
    N = w.shape[1] if transpose_w else w.shape[2]
    xp, num_tiles = _tiles(x, tile)
    group, tile_id, valid, starts, ends = _schedule(sizes, num_tiles, tile)
    dims = (((1,), (1,)), ((), ())) if transpose_w else (((1,), (0,)), ((), ()))
    w_dtype = x.dtype if isinstance(w, QArray) else w.dtype
    out_dtype = jnp.result_type(x.dtype, w_dtype)

    def visit(out, v):
        g, t = group[v], tile_id[v]
        xt = jax.lax.dynamic_slice_in_dim(xp, t * tile, tile)
        y = jax.lax.dot_general(xt, take(w, g, w_dtype), dims, preferred_element_type=jnp.float32)
        y = jnp.where(_row_mask(t, g, valid[v], starts, ends, tile)[:, None], y, 0).astype(out_dtype)
        cur = jax.lax.dynamic_slice_in_dim(out, t * tile, tile)
        return jax.lax.dynamic_update_slice_in_dim(out, cur + y, t * tile, 0), None

    out, _ = jax.lax.scan(visit, jnp.zeros((num_tiles * tile, N), out_dtype), jnp.arange(group.shape[0]))
    return out[:M]


def _tgmm_impl(x, dy, sizes, tile, w_dtype):
    """dw[g] = x[rows of g]^T @ dy[rows of g] -> [G, K, N]."""
    G, K, N = sizes.shape[0], x.shape[1], dy.shape[1]
    xp, num_tiles = _tiles(x, tile)
    dyp, _ = _tiles(dy, tile)
    group, tile_id, valid, starts, ends = _schedule(sizes, num_tiles, tile)

    def visit(dw, v):
        g, t = group[v], tile_id[v]
        xt = jax.lax.dynamic_slice_in_dim(xp, t * tile, tile)
        xt = jnp.where(_row_mask(t, g, valid[v], starts, ends, tile)[:, None], xt, 0)
        dt = jax.lax.dynamic_slice_in_dim(dyp, t * tile, tile)
        upd = jax.lax.dot_general(xt, dt, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return dw.at[g].add(upd), None

    dw, _ = jax.lax.scan(visit, jnp.zeros((G, K, N), jnp.float32), jnp.arange(group.shape[0]))
    return dw.astype(w_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(x, w, sizes, tile):
    return _gmm_impl(x, w, sizes, tile)


def _gmm_fwd(x, w, sizes, tile):
    return _gmm_impl(x, w, sizes, tile), (x, w, sizes)


def _gmm_bwd(tile, res, dy):
    x, w, sizes = res
    dx = _gmm_impl(dy, w, sizes, tile, transpose_w=True).astype(x.dtype)
    dw = _tgmm_impl(x, dy, sizes, tile, w.dtype)
    return dx, dw, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def _mgpu_kernels():
    """(ragged_dot, transposed_ragged_dot) of Pallas' Mosaic GPU ops (they run on Hopper GPUs only). Tests substitute
    stand-ins here to check the wrapper on the CPU."""
    def transposed(*args, **kwargs):
        with _sm_count_when_compiling_ahead():
            return transposed_ragged_dot_mgpu.transposed_ragged_dot(*args, **kwargs)

    return ragged_dot_mgpu.ragged_dot, transposed


H100_SMS = 132  # what ragged_dot_mgpu assumes for its grid, H100 SXM and H200 alike


@contextlib.contextmanager
def _sm_count_when_compiling_ahead():
    """transposed_ragged_dot sizes its grid by ``jax.devices()[0].core_count``, read while tracing. A host that
    compiles for an H100 without one (``l4jax plan``) has no GPU device to ask; there, for the length of that one
    call, the answer is the H100's count (the forward kernel's own assumption). On a GPU nothing changes."""
    devices = jax.devices
    if devices()[0].platform == "gpu":
        yield
        return
    jax.devices = lambda *a, **k: [type("CompileOnlyH100", (), {"core_count": H100_SMS})()]
    try:
        yield
    finally:
        jax.devices = devices


def _grid_block_n(n: int) -> int:
    # Blocks of N walked per row of blocks (L2 reuse); it must divide N's blocks. 4 was fastest forward on an H200.
    return 4 if n % (4 * MGPU_BLOCKS["block_n"]) == 0 else 1


def _rows_in_groups(y: jax.Array, sizes: jax.Array) -> jax.Array:
    """y with the rows past sum(sizes) set to 0: the kernels never write them."""
    return jnp.where((jnp.arange(y.shape[0]) < jnp.sum(sizes))[:, None], y, 0)


@jax.custom_vjp
def _gmm_mgpu(x, w, sizes):
    ragged, _ = _mgpu_kernels()
    y = ragged(x, w, group_sizes=sizes, grid_block_n=_grid_block_n(w.shape[2]), **MGPU_BLOCKS)
    return _rows_in_groups(y, sizes)


def _gmm_mgpu_fwd(x, w, sizes):
    return _gmm_mgpu(x, w, sizes), (x, w, sizes)


def _gmm_mgpu_bwd(res, dy):
    x, w, sizes = res
    ragged, transposed = _mgpu_kernels()
    dy = _rows_in_groups(dy.astype(x.dtype), sizes)
    # dx = dy w^T per group: w [G, K, N] read as [G, N', K'] with N' = K (the kernel's transpose_rhs).
    dx = ragged(dy, w, group_sizes=sizes, transpose_rhs=True, grid_block_n=_grid_block_n(w.shape[1]),
                **MGPU_BLOCKS)
    dw = transposed(x, dy, group_sizes=sizes, grid_block_n=1, **MGPU_BLOCKS)  # [G, K, N]
    dw = jnp.where((sizes > 0)[:, None, None], dw, 0)  # an expert without rows gets an exact zero
    return _rows_in_groups(dx, sizes), dw.astype(w.dtype), None


_gmm_mgpu.defvjp(_gmm_mgpu_fwd, _gmm_mgpu_bwd)
