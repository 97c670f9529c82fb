"""Training losses: next-token cross-entropy with a loss mask, and codistillation from a teacher.

Every loss returns a *sum* over the masked tokens and the token count, never a mean: gradient accumulation then
adds sums over microbatches and divides once by the total count, which gives exactly the gradient of the whole
batch's mean however the batch is split.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits [B, T, V], targets [B, T] int, mask [B, T] (1 = counts) -> (sum of -log p(target), token count).

    Computed in fp32 whatever the logits' dtype: a bf16 log-softmax over a 200k vocabulary loses the small terms.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


def codistillation(student: jax.Array, teacher: jax.Array, targets: jax.Array, mask: jax.Array, *,
                   alpha: float | str = "confidence", tau: float = 1.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """a * tau^2 * KL(teacher_tau || student_tau) + (1 - a) * CE(labels), summed over masked tokens.

    student, teacher [B, T, V] logits (the teacher's carry no gradient); targets, mask [B, T].
    ``alpha``: a number in [0, 1] (a fixed weight, e.g. from a schedule), or ``"confidence"``: per token, a is the
    teacher's probability of the true next token (at temperature 1). Where the teacher is confident and right its
    whole distribution is a richer target than the one-hot label, so it gets the weight; where it is wrong or
    unsure the label takes over. a = 0 is plain cross-entropy and a = 1 pure distillation, exactly.
    The tau^2 factor keeps the soft term's gradient scale independent of tau (Hinton et al. 2015).
    Returns (loss sum, token count, sum of a over tokens).
    """
    if isinstance(alpha, str):
        if alpha != "confidence":
            raise ValueError(f"alpha: expected a number in [0, 1] or 'confidence', got {alpha!r}")
    elif not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: must be in [0, 1], got {alpha}")
    if not tau > 0:
        raise ValueError(f"tau: must be > 0, got {tau}")
    teacher = jax.lax.stop_gradient(teacher.astype(jnp.float32))
    student = student.astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    logp_s = jax.nn.log_softmax(student, axis=-1)
    ce = -jnp.take_along_axis(logp_s, targets[..., None], axis=-1)[..., 0]
    logq_t = jax.nn.log_softmax(teacher / tau, axis=-1)
    logq_s = logp_s if tau == 1.0 else jax.nn.log_softmax(student / tau, axis=-1)
    kl = jnp.sum(jnp.exp(logq_t) * (logq_t - logq_s), axis=-1) * tau ** 2
    if alpha == "confidence":
        a = jnp.exp(jnp.take_along_axis(jax.nn.log_softmax(teacher, axis=-1), targets[..., None], axis=-1)[..., 0])
    else:
        a = jnp.full(ce.shape, alpha, jnp.float32)
    per_token = a * kl + (1.0 - a) * ce
    return jnp.sum(per_token * mask), jnp.sum(mask), jnp.sum(a * mask)
