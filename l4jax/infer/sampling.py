"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus), for a compiled decode loop.

Shapes: logits [B, V] (any leading axes work: [..., V]), tokens [B] int32.

Everything here is pure JAX with fixed shapes, so it can sit inside ``jax.jit`` / ``lax.while_loop``. The knobs
``temperature``, ``top_k`` and ``top_p`` are Python numbers, i.e. *static*: they are validated in Python and choose
which ops are traced (greedy or not, top-k fixes a shape, top-p on or off), so pass them through
``functools.partial`` or ``static_argnames``, never as traced arrays (that raises a TypeError).

Order of operations is the one Hugging Face ``generate`` uses: divide by temperature, keep the top-k logits, then
keep the nucleus of the renormalised top-k distribution, then draw with ``jax.random.categorical``. Removed tokens
get logit -inf, so they have probability exactly 0 and can never be drawn.
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp

# A cumulative probability within this distance of top_p counts as having reached it. Softmax and cumsum in float32
# land a few ulps either side of exact sums (0.5 + 0.3 from log-probabilities comes out as 0.80000007), so without
# the slack an exact boundary (probs [0.5, 0.3, ...], top_p 0.8 keeps two tokens) would depend on rounding.
_TOP_P_SLACK = 1e-6


def _check(vocab: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise a ValueError/TypeError naming the bad argument. All checks use static Python values only."""
    if not isinstance(temperature, numbers.Real) or isinstance(temperature, bool):
        raise TypeError(f"temperature must be a Python float (it is static), got {type(temperature).__name__}")
    if math.isnan(temperature) or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None:
        if not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool):
            raise TypeError(f"top_k must be a Python int or None (it is static), got {type(top_k).__name__}")
        if not 1 <= top_k <= vocab:
            raise ValueError(f"top_k must be in [1, vocab size {vocab}], got {top_k}")
    if top_p is not None:
        if not isinstance(top_p, numbers.Real) or isinstance(top_p, bool):
            raise TypeError(f"top_p must be a Python float or None (it is static), got {type(top_p).__name__}")
        if not 0.0 < top_p <= 1.0:  # also rejects NaN
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def filter_logits(logits: jax.Array, top_k: int | None = None, top_p: float | None = None) -> jax.Array:
    """Top-k then top-p filtering: logits [..., V] -> float32 [..., V] with every removed token set to -inf.

    top_k keeps exactly the k largest logits per row; among equal logits the lower token id wins, so the kept set
    is deterministic. top_p keeps the smallest set of most probable tokens (probabilities from the softmax of the
    top-k-filtered logits) whose total probability is >= top_p; the most probable token is always kept, and ties
    again favour the lower id. ``top_k=None`` and ``top_p`` of None or 1.0 leave every token in (no sort is
    traced). Logits are upcast to float32 first so the cumulative sum over a 200k vocabulary stays accurate.
    """
    _check(logits.shape[-1], 0.0, top_k, top_p)
    use_p = top_p is not None and top_p < 1.0
    return _filter(logits, jnp.float32(top_p if use_p else 1.0), top_k, use_p)


def sample(logits: jax.Array, key: jax.Array, *, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None) -> jax.Array:
    """Draw one token per row: logits [B, V] -> int32 [B].

    temperature 0 is greedy argmax (the key is unused, the lowest id wins a tie). Otherwise logits / temperature
    are filtered by ``filter_logits(top_k, top_p)`` and sampled with ``jax.random.categorical(key, ...)``, so a
    given key always gives the same tokens. temperature, top_k and top_p must be static Python values (see the
    module docstring); they are validated even when greedy, so a bad setting fails on the first call.
    """
    _check(logits.shape[-1], temperature, top_k, top_p)
    if temperature == 0:
        # Both filters always keep the argmax, so greedy needs neither.
        return _greedy(logits)
    use_p = top_p is not None and top_p < 1.0
    return _sample(logits, key, jnp.float32(temperature), jnp.float32(top_p if use_p else 1.0), top_k, use_p)


# The public functions validate (which needs plain Python values) and then call these jitted bodies: called eagerly
# they compile once instead of dispatching a dozen small ops; inside an outer jit they are inlined. Only the choices
# that change the traced graph are static (greedy or not, top_k, top-p on or off); the temperature and top_p values
# travel as float32 scalars, so trying another value does not recompile.
@functools.partial(jax.jit, static_argnums=(2, 3))
def _filter(logits: jax.Array, top_p: jax.Array, top_k: int | None, use_p: bool) -> jax.Array:
    vocab = logits.shape[-1]
    logits = logits.astype(jnp.float32)
    if top_k is None and not use_p:
        return logits

    lead = logits.shape[:-1]
    flat = logits.reshape(-1, vocab)
    # lax.top_k sorts descending and puts the lower index first among equal values: that is the tie rule for both
    # filters. Without top_k the whole row is sorted (top_p needs the full order).
    vals, idx = jax.lax.top_k(flat, top_k if top_k is not None else vocab)    # [N, K]
    keep = jnp.ones(vals.shape, dtype=bool)
    if use_p:
        probs = jax.nn.softmax(vals, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs                      # exclusive cumsum
        # Keep token i while the strictly more probable tokens have not reached top_p yet.
        keep = mass_before < top_p - _TOP_P_SLACK
        keep = keep.at[:, 0].set(True)
    rows = jnp.arange(flat.shape[0])[:, None]
    allowed = jnp.zeros(flat.shape, dtype=bool).at[rows, idx].set(keep)
    return jnp.where(allowed, flat, -jnp.inf).reshape(*lead, vocab)


@jax.jit
def _greedy(logits: jax.Array) -> jax.Array:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array, top_k: int | None,
            use_p: bool) -> jax.Array:
    scaled = logits.astype(jnp.float32) / temperature
    return jax.random.categorical(key, _filter(scaled, top_p, top_k, use_p), axis=-1).astype(jnp.int32)
