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


def token_logprobs_by_blocks(hidden: jax.Array, head: jax.Array, targets: jax.Array,
                             block: int = 256) -> jax.Array:
    """log p(target) [B, T] fp32 under the logits ``hidden @ head``, the LM head applied ``block`` tokens of every
    row at a time.

    hidden [B, T, D]; head [D, V]; targets [B, T]. Each block's fp32 logits [B, block, V] live only inside one step
    of a scan, which autodiff recomputes rather than keeps: no [B, T, V] tensor exists in the forward or the
    backward pass (for the bench preset at B=4, T=2048: 6.6 GB of fp32 logits and as much of their gradient). The
    blocks run along T, so the batch stays where the mesh put it.
    """
    B, T, D = hidden.shape
    block = min(block, T)
    pad = -T % block
    hidden, targets = (jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) for a in (hidden, targets))
    n = (T + pad) // block

    def blocks(a):  # [B, T, ...] -> [n, B, block, ...]
        return jnp.moveaxis(a.reshape(B, n, block, *a.shape[2:]), 1, 0)

    @jax.checkpoint
    def one(_, xs):
        h, t = xs
        logits = jnp.einsum("btd,dv->btv", h, head, preferred_element_type=jnp.float32)
        return None, jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)

    _, logp = jax.lax.scan(one, None, (blocks(hidden), blocks(targets)))  # [n, B, block]
    return jnp.moveaxis(logp, 0, 1).reshape(B, T + pad)[:, :T]


def cross_entropy_by_blocks(hidden: jax.Array, head: jax.Array, targets: jax.Array, mask: jax.Array,
                            block: int = 256) -> tuple[jax.Array, jax.Array]:
    """``cross_entropy(hidden @ head, ...)`` without [B, T, V] logits (``token_logprobs_by_blocks``); same sums."""
    mask = mask.astype(jnp.float32)
    return -jnp.sum(token_logprobs_by_blocks(hidden, head, targets, block) * mask), jnp.sum(mask)


def dpo_pairs(logp: jax.Array, ref_logp: jax.Array, mask: jax.Array, segment_ids: jax.Array, num_pairs: int, *,
              beta: float, sft_weight: float = 0.0) -> dict[str, jax.Array]:
    """Direct preference optimisation (Rafailov et al. 2023) of packed pairs: each pair's terms, [B, P] each.

    logp, ref_logp [B, T]: log p(target) under the policy and the frozen reference (no gradient flows into it);
    mask [B, T]: 1 on the answers' tokens (as targets); segment_ids [B, T]: pair p of a row is segments 2p + 1
    (chosen) and 2p + 2 (rejected); P = ``num_pairs``.

    With d(s) = the sum over the tokens of answer s of (logp - ref_logp): ``margin`` z = beta * (d(chosen) -
    d(rejected)), ``dpo`` = -log sigmoid(z) = softplus(-z) (log 2 when the policy is the reference), ``sft`` the
    chosen answer's mean cross-entropy, ``loss`` = dpo + ``sft_weight`` * sft, ``reward_chosen`` and
    ``reward_rejected`` beta * d.
    """
    mask = mask.astype(jnp.float32)
    which = 2 * jnp.arange(num_pairs, dtype=segment_ids.dtype) + 1              # [P] the chosen segments
    chosen = (segment_ids[..., None] == which).astype(jnp.float32)              # [B, T, P]
    rejected = (segment_ids[..., None] == which + 1).astype(jnp.float32)
    d = (logp - jax.lax.stop_gradient(ref_logp)) * mask
    d_chosen = jnp.einsum("bt,btp->bp", d, chosen)
    d_rejected = jnp.einsum("bt,btp->bp", d, rejected)
    z = beta * (d_chosen - d_rejected)
    sft = -jnp.einsum("bt,btp->bp", logp * mask, chosen) / jnp.maximum(jnp.einsum("bt,btp->bp", mask, chosen), 1.0)
    dpo_loss = jax.nn.softplus(-z)
    return {"loss": dpo_loss + sft_weight * sft, "dpo": dpo_loss, "sft": sft, "margin": z,
            "reward_chosen": beta * d_chosen, "reward_rejected": beta * d_rejected}


def dpo(logp: jax.Array, ref_logp: jax.Array, mask: jax.Array, segment_ids: jax.Array, pairs: jax.Array, *,
        beta: float, sft_weight: float = 0.0) -> dict[str, jax.Array]:
    """``dpo_pairs`` summed over the pairs the rows hold (pairs [B, P]: 1 where row b holds pair p), with
    ``accuracy`` (the count of z > 0) and ``pairs`` (the count)."""
    per = dpo_pairs(logp, ref_logp, mask, segment_ids, pairs.shape[-1], beta=beta, sft_weight=sft_weight)
    per["accuracy"] = (per["margin"] > 0).astype(jnp.float32)
    out = {k: jnp.sum(v * pairs) for k, v in per.items()}
    out["pairs"] = jnp.sum(pairs)
    return out


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
