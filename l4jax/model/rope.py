"""Rotary position embedding in Llama 4's interleaved-pair form: the text decoder's 1-D RoPE (optionally with
llama3 frequency scaling) and the vision tower's 2-D RoPE share one rotation, ``apply_rope``.

Llama 4 rotates adjacent pairs (x[2j], x[2j+1]) as one complex number; it is not the rotate-half layout, and the
HF checkpoints keep Meta's q/k row order, so no weight permutation is needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..config import RopeScaling


def inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """[head_dim/2] inverse frequencies 1/theta^(2j/hd), fp32, rescaled by llama3 scaling when given."""
    inv = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    inv = inv.astype(np.float32)
    if scaling is None:
        return inv
    f, lo, hi = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    orig = scaling.original_max_position_embeddings
    wavelen = 2 * np.pi / inv
    lo_wavelen, hi_wavelen = orig / lo, orig / hi
    scaled = np.where(wavelen > lo_wavelen, inv / f, inv)
    in_band = (wavelen >= hi_wavelen) & (wavelen <= lo_wavelen)
    # With lo == hi (Scout: 1.0/1.0) the band is empty and the smoothing formula divides by zero; evaluate it
    # only where it is selected so no inf/NaN is ever produced.
    denom = np.where(in_band, hi - lo, 1.0)
    smooth = np.where(in_band, (orig / wavelen - lo) / denom, 0.0)
    smoothed = (1 - smooth) * scaled / f + smooth * scaled
    return np.where(in_band, smoothed, scaled).astype(np.float32)


def rope_angles(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """positions [B, T] (int) -> (cos, sin), each [B, T, hd/2] fp32."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return jnp.cos(angles), jnp.sin(angles)


def grid_angles(grid: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """The vision tower's 2-D RoPE: (cos, sin), each [P + 1, hd/2] fp32, for a grid x grid patch grid (P = grid^2)
    followed by the CLS token.

    Pair m < hd/4 rotates by (col + 1) * f[m], pair hd/4 + m by (row + 1) * f[m], with f[m] = theta^(-4m/hd)
    and col, row the patch's grid coordinates; the CLS token gets angle 0 (the identity).
    """
    if head_dim % 4:
        raise ValueError(f"vision head_dim {head_dim} (hidden_size / num_attention_heads) must be divisible by 4: "
                         f"2D RoPE gives half of each head's rotation pairs to columns and half to rows")
    quarter = head_dim // 4
    freq = 1.0 / (np.float32(theta) ** (np.arange(0, 2 * quarter, 2, dtype=np.float32) / np.float32(2 * quarter)))
    idx = np.arange(grid * grid)
    col, row = (idx % grid + 1).astype(np.float32), (idx // grid + 1).astype(np.float32)
    angles = np.concatenate([col[:, None] * freq, row[:, None] * freq], axis=-1).astype(np.float32)
    angles = np.concatenate([angles, np.zeros((1, 2 * quarter), np.float32)])  # CLS: identity rotation
    return np.cos(angles), np.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs. x [..., T, N, hd]; cos/sin [..., T, hd/2] (text: [B, T, hd/2]; vision: [T, hd/2]),
    the same for every head N. fp32 math, result in x.dtype."""
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    re, im = xf[..., 0], xf[..., 1]
    c, s = cos[..., None, :], sin[..., None, :]
    out = jnp.stack([re * c - im * s, re * s + im * c], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
