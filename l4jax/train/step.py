"""The sharded train step: next-token loss (or codistillation, or DPO), gradient accumulation, AdamW, under one jit.

    state = {"step": [], "params": trainable tree, "opt": optax state}     (donated, sharded by the rules)
    frozen = base weights when LoRA trains adapters only; DPO's reference weights when it trains them all; else {}
    fixed  = weights the step reads and never trains: {"teacher": the codistillation teacher's, "vision": the
             vision tower's when the data have images}, each only when used
    batch  = {"inputs", "targets", "segment_ids", "positions", "loss_mask"}: [A, b, T], A microbatches of b rows,
             for DPO "pairs" [A, b, P] (``data.preferences``), with images "pixels" [A, b, K, 3, S, S] (each row's
             tiles in the order of its ``<|patch|>`` tokens; ``PackedDataset(docs_pixels=...)``)

DPO's reference is the model at the start: under LoRA the frozen base itself (the model with its adapters off, so
no second copy of the weights exists), otherwise a frozen copy of the starting weights.

``Trainer`` builds the module (scanned layers, remat), the optimizer, the shardings of every tree from the logical
axis rules, and the jitted step. ``train.loop`` runs it with data, checkpoints and metrics.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ..config import ConfigError, Llama4Config
from ..model.axes import BATCH, LENGTH
from ..model.decoder import Inputs, Llama4Text, abstract_params, init_params, stack_layers, unstack_layers
from ..model.kernels import Kernels
from ..model.vision import ImageEncoder, merge_image_features
from ..parallel import batch_multiple, param_shardings, partitioning, platform, put
from . import lora as lora_lib
from .losses import (codistillation, cross_entropy, cross_entropy_by_blocks, dpo, dpo_pairs,
                     token_logprobs_by_blocks)
from .settings import TrainConfig

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
DPO_KEYS = BATCH_KEYS + ("pairs",)


def lr_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to ``lr``, then cosine decay to ``min_lr_ratio * lr`` at the last step."""
    warmup = min(tc.warmup_steps, tc.steps - 1)
    return optax.warmup_cosine_decay_schedule(0.0, tc.lr, warmup, max(tc.steps, warmup + 1),
                                              tc.lr * tc.min_lr_ratio)


def decay_mask(params):
    """True where weight decay applies: every weight except norm scales (Llama 4 has no biases)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(getattr(k, "key", None) == "scale" for k in path), params)


def optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(tc.clip_norm),
                       optax.adamw(lr_schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay,
                                   mask=decay_mask))


class Trainer:
    """Everything the step needs, specialised to one model, one training config and one mesh (or none).

    ``teacher``: a loaded ``Model`` to codistil from. ``vision``: the vision tower's weights (``vision_model``,
    ``projector``; frozen) when the batches carry images (``pixels``), which then enter as early fusion."""

    def __init__(self, config: Llama4Config, tc: TrainConfig, mesh=None, teacher=None, vision=None):
        cfg = config.text
        self.config, self.tc, self.mesh, self.teacher, self.vision = config, tc, mesh, teacher, vision
        _check_setup(config, tc, mesh, teacher)
        if vision is not None and config.vision is None:
            raise ConfigError("vision weights given, but the model config has no vision_config")
        self.aux = tc.load_balance > 0 or tc.z_loss > 0
        self.part = partitioning(cfg, mesh)
        kernels = Kernels.for_platform(platform(mesh), moe=tc.moe_impl, attention=tc.attention_impl,
                                       query_block=tc.query_block, training=True)
        # Without a teacher the loss applies the LM head itself, a block of tokens at a time (no [B, T, V] logits).
        self.module = Llama4Text(cfg, self.part, kernels, dtype=jnp.dtype(tc.compute_dtype),
                                 param_dtype=jnp.dtype(tc.param_dtype), scan=tc.scan, remat=tc.remat,
                                 aux_loss=self.aux, logits=teacher is not None)
        self.tx = optimizer(tc)
        self.lora = tc.lora
        self._layout_state()
        self.dpo = tc.dpo if tc.objective == "dpo" else None
        self.batch_keys = (BATCH_KEYS if self.dpo is None else DPO_KEYS) + (("pixels",) if vision else ())
        # The step divides every sum by this count: tokens in the loss, or preference pairs for DPO.
        self.count = "tokens" if self.dpo is None else "pairs"
        self.batch_sharding = None if mesh is None else self.part.sharding((None, BATCH, LENGTH))
        self.batch_shardings = None if mesh is None else {
            k: self.part.sharding((None, BATCH) + (None,) * (4 if k == "pixels" else 1))
            if k in ("pairs", "pixels") else self.batch_sharding for k in self.batch_keys}
        fixed_sh = {}
        if teacher is not None and mesh is not None:
            fixed_sh["teacher"] = param_shardings(teacher.config, teacher.part, teacher.dtype)
        if vision is not None and mesh is not None:
            every = param_shardings(config, self.part, jnp.dtype(tc.param_dtype))
            fixed_sh["vision"] = {k: every[k] for k in vision}
        self._step = jax.jit(self._train_step, donate_argnums=(0,),
                             in_shardings=None if mesh is None else (
                                 self.state_shardings, self.frozen_shardings, fixed_sh, self.batch_shardings),
                             out_shardings=None if mesh is None else (self.state_shardings, None))

    def _layout_state(self) -> None:
        """Logical axes, shapes and shardings of the full parameters, of what is trained and of the optimizer."""
        boxed = abstract_params(self.module)
        self.param_axes = nn.get_partition_spec(boxed)
        self.param_shapes = nn.meta.unbox(boxed)
        if self.lora is None:
            trainable_boxed = boxed
        else:
            shapes = jax.eval_shape(lambda: lora_lib.init(self.param_shapes, self.lora, jax.random.key(0)))
            axes = lora_lib.logical_axes(shapes, self.param_axes)
            trainable_boxed = jax.tree.map(lambda s, a: nn.LogicallyPartitioned(s, tuple(a)), shapes, axes,
                                           is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
        opt_boxed = jax.eval_shape(self.tx.init, trainable_boxed)
        state_axes = {"step": jax.sharding.PartitionSpec(), "params": nn.get_partition_spec(trainable_boxed),
                      "opt": nn.get_partition_spec(opt_boxed)}
        self.state_shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": nn.meta.unbox(trainable_boxed),
                             "opt": nn.meta.unbox(opt_boxed)}
        self.state_shardings = self._shardings(state_axes)
        holds = self.lora is not None or self.tc.objective == "dpo"
        self.frozen_shardings = self._shardings(self.param_axes) if holds else {}

    def _shardings(self, axes):
        if self.mesh is None:
            return jax.tree.map(lambda _: None, axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        return nn.logical_to_mesh_sharding(axes, self.mesh, self.part.rules)

    # -- state ----------------------------------------------------------------------------------------------------
    def init_state(self, params=None, seed: int | None = None) -> tuple[dict, dict]:
        """(state, frozen). ``params``: full weights in the per-layer layout (e.g. ``l4jax.load(...).params``);
        None = random init from the seed, created directly on its shardings."""
        key = jax.random.key(self.tc.seed if seed is None else seed)
        base_sh = self._shardings(self.param_axes)
        if params is None:
            make = lambda k: nn.meta.unbox(init_params(self.module, k))  # noqa: E731
            start = lambda: jax.jit(make, out_shardings=None if self.mesh is None else base_sh)(key)  # noqa: E731
        else:
            stack = (lambda p: stack_layers(p, self.config.text)) if self.tc.scan else (lambda p: p)
            cast = lambda p: jax.tree.map(lambda a: a.astype(self.tc.param_dtype), stack(p))  # noqa: E731
            start = lambda: jax.jit(cast, out_shardings=None if self.mesh is None else base_sh)(params)  # noqa: E731
        full = start()
        if self.lora is None:
            # DPO's reference: the same starting weights made again (the trained ones are donated at every step).
            trainable, frozen = full, (start() if self.dpo is not None else {})
        else:
            make_lora = lambda k: lora_lib.init(full, self.lora, k)  # noqa: E731
            trainable = jax.jit(make_lora, out_shardings=self.state_shardings["params"] if self.mesh else None)(
                jax.random.fold_in(key, 1))
            frozen = full
        opt = jax.jit(self.tx.init, out_shardings=self.state_shardings["opt"] if self.mesh else None)(trainable)
        step = jnp.zeros((), jnp.int32)
        if self.mesh is not None:  # committed like the step's output, or the second step would compile again
            step = jax.device_put(step, self.state_shardings["step"])
        return {"step": step, "params": trainable, "opt": opt}, frozen

    def abstract_state(self) -> dict:
        """ShapeDtypeStructs with this mesh's shardings (one device without a mesh): a checkpoint restore target."""
        if self.mesh is None:
            one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one), self.state_shapes)
        return jax.tree.map(lambda s, shd: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shd),
                            self.state_shapes, self.state_shardings,
                            is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))

    def full_params(self, state: dict, frozen: dict) -> dict:
        """The model weights in the per-layer layout (adapters merged), for export and evaluation."""
        params = state["params"] if self.lora is None else lora_lib.merge(frozen, state["params"], self.lora)
        return unstack_layers(params, self.config.text) if self.tc.scan else params

    # -- the step -------------------------------------------------------------------------------------------------
    def put_batch(self, batch: dict) -> dict:
        """Host batch [B, T] per key -> device arrays [A, b, T], b rows split over the batch axes."""
        A = self.tc.grad_accum
        out = {}
        for k in self.batch_keys:
            host = batch[k].reshape(A, -1, *batch[k].shape[1:])
            out[k] = jnp.asarray(host) if self.mesh is None else put(host, self.batch_shardings[k])
        return out

    @property
    def fixed(self) -> dict:
        """The step's weights that are read and never trained (see the module docstring)."""
        out = {} if self.teacher is None else {"teacher": self.teacher.params}
        return out if self.vision is None else {**out, "vision": self.vision}

    def step(self, state: dict, frozen: dict, batch: dict) -> tuple[dict, dict]:
        """One optimizer step on a host batch; ``state`` is donated. Returns (state, metrics as device scalars)."""
        return self._step(state, frozen, self.fixed, self.put_batch(batch))

    def image_features(self, fixed, mb) -> jax.Array | None:
        """[b, K * tokens_per_tile, D] features of each row's tiles (``pixels`` [b, K, 3, S, S]), None without."""
        if "pixels" not in mb:
            return None
        v, dtype = self.config.vision, jnp.dtype(self.tc.compute_dtype)
        b, K = mb["pixels"].shape[:2]
        encoder = ImageEncoder(v, self.config.text.hidden_size, dtype=dtype, param_dtype=dtype)
        vision = jax.tree.map(lambda a: jax.lax.stop_gradient(a.astype(dtype)), fixed["vision"])
        features = encoder.apply({"params": vision}, mb["pixels"].reshape(b * K, *mb["pixels"].shape[2:]))
        return features.reshape(b, K * v.tokens_per_tile, -1)

    def inputs(self, params, features, mb) -> Inputs:
        """The decoder's inputs of a microbatch under ``params``: with image ``features``, embeddings whose
        ``<|patch|>`` rows are the features (each row's own, in order), as inference fuses them."""
        embeds = None
        if features is not None:
            embeds = jnp.take(params["embed"], mb["inputs"], axis=0).astype(features.dtype)
            index = self.config.image_token_index
            embeds = jax.vmap(lambda e, ids, f: merge_image_features(e[None], ids[None], f, index)[0])(
                embeds, mb["inputs"], features)
        return Inputs(mb["inputs"], positions=mb["positions"], segment_ids=mb["segment_ids"], embeds=embeds)

    def loss(self, trainable, frozen, fixed, mb) -> tuple[jax.Array, dict]:
        """Summed loss of one microbatch [b, T] and its metric sums; ``fixed`` as ``self.fixed`` (None: {})."""
        tc = self.tc
        fixed = fixed or {}
        params = trainable if self.lora is None else lora_lib.merge(frozen, trainable, self.lora)
        features = self.image_features(fixed, mb)
        inputs = self.inputs(params, features, mb)
        out = self.module.apply({"params": params}, inputs, mutable=["aux"] if self.aux else False)
        (out, aux) = out if self.aux else (out, {})
        if self.dpo is not None:
            sums = dpo(*self._logprobs(out, frozen, features, mb), mb["loss_mask"], mb["segment_ids"],
                       mb["pairs"], beta=self.dpo.beta, sft_weight=self.dpo.sft_weight)
            sums["tokens"] = jnp.sum(mb["loss_mask"].astype(jnp.float32))
            total = sums["loss"]
        elif self.teacher is None:
            ce, n = cross_entropy_by_blocks(out.hidden, out.head, mb["targets"], mb["loss_mask"])
            sums = {"ce": ce, "tokens": n}
            total = ce
        else:
            ce, n = cross_entropy(out.logits, mb["targets"], mb["loss_mask"])
            t_logits = self.teacher.module.apply({"params": fixed["teacher"]}, inputs).logits
            total, _, a = codistillation(out.logits, t_logits, mb["targets"], mb["loss_mask"],
                                         alpha=tc.distill.alpha, tau=tc.distill.tau)
            sums = {"ce": ce, "tokens": n, "alpha": a}
        if self.aux:
            # Mean over MoE layers (scanned layers sow one value per block), weighted like the main loss (by tokens
            # or pairs).
            n = sums[self.count]
            for name, coef in (("load_balance", tc.load_balance), ("z_loss", tc.z_loss)):
                vals = [v for path, v in jax.tree_util.tree_leaves_with_path(aux) if path[-2].key == name]
                term = jnp.mean(jnp.concatenate([jnp.ravel(v) for v in vals]))
                sums[name] = term * n
                total = total + coef * term * n
        sums["loss"] = total
        return total, sums

    def _logprobs(self, out, reference, features, mb) -> tuple[jax.Array, jax.Array]:
        """log p(target) [b, T] under the policy (its forward ``out``) and under the frozen ``reference`` weights
        (its own embeddings around the same image features)."""
        reference = jax.lax.stop_gradient(reference)
        ref = self.module.apply({"params": reference}, self.inputs(reference, features, mb))
        return (token_logprobs_by_blocks(out.hidden, out.head, mb["targets"]),
                token_logprobs_by_blocks(ref.hidden, ref.head, mb["targets"]))

    def pair_terms(self, state: dict, frozen: dict, batch: dict) -> dict:
        """DPO only: each pair's terms (``losses.dpo_pairs``: margin, rewards, loss...) [A, b, P] of a host batch
        under the current weights; where ``batch["pairs"]`` is 0 the values mean nothing."""
        if self.dpo is None:
            raise ValueError("pair_terms: this trainer's objective is not dpo")
        return self._pair_terms(state, frozen, self.fixed, self.put_batch(batch))

    @functools.cached_property
    def _pair_terms(self):
        def terms(state, frozen, fixed, mb):
            params = state["params"] if self.lora is None else lora_lib.merge(frozen, state["params"], self.lora)
            features = self.image_features(fixed, mb)
            out = self.module.apply({"params": params}, self.inputs(params, features, mb))
            return dpo_pairs(*self._logprobs(out, frozen, features, mb), mb["loss_mask"],
                             mb["segment_ids"], mb["pairs"].shape[-1], beta=self.dpo.beta,
                             sft_weight=self.dpo.sft_weight)
        return jax.jit(jax.vmap(terms, in_axes=(None, None, None, 0)))

    def _train_step(self, state, frozen, fixed, batch):
        grad_fn = jax.grad(self.loss, has_aux=True)

        def micro(acc, mb):
            g, sums = grad_fn(state["params"], frozen, fixed, mb)
            return jax.tree.map(jnp.add, acc, (g, sums)), None

        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), state["params"])
        sums0 = jax.eval_shape(lambda: self.loss(state["params"], frozen, fixed,
                                                 jax.tree.map(lambda a: a[0], batch))[1])
        acc0 = (zeros, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums0))
        if self.tc.grad_accum == 1:  # no loop around a single microbatch
            (grads, sums), _ = micro(acc0, jax.tree.map(lambda a: a[0], batch))
        else:
            (grads, sums), _ = jax.lax.scan(micro, acc0, batch)
        n = jnp.maximum(sums[self.count], 1.0)
        grads = jax.tree.map(lambda g, p: (g / n).astype(p.dtype), grads, state["params"])
        updates, opt = self.tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {k: v / n for k, v in sums.items() if k not in ("tokens", "pairs")}
        if self.dpo is not None:
            metrics["pairs"] = sums["pairs"]
        # Checked on the host before a checkpoint is written: a finite loss can still give an overflowing update.
        finite = jnp.all(jnp.stack([jnp.isfinite(p).all() for p in jax.tree.leaves(params)]))
        metrics.update(tokens=sums["tokens"], grad_norm=optax.tree.norm(grads), params_finite=finite,
                       lr=lr_schedule(self.tc)(state["step"]))
        return {"step": state["step"] + 1, "params": params, "opt": opt}, metrics


def _check_setup(config: Llama4Config, tc: TrainConfig, mesh, teacher) -> None:
    """What the config alone cannot check: the batch against the mesh, the teacher against the student."""
    if tc.seq_len > config.text.max_position_embeddings:
        raise ConfigError(f"TrainConfig.seq_len: {tc.seq_len} is longer than the model's max_position_embeddings "
                          f"{config.text.max_position_embeddings}")
    n = batch_multiple(mesh)
    if tc.microbatch % n:
        raise ConfigError(f"TrainConfig.batch_size: {tc.batch_size} sequences in {tc.grad_accum} microbatch(es) of "
                          f"{tc.microbatch} cannot be split over the mesh's batch axes (data x fsdp = {n}); use a "
                          f"microbatch that is a multiple of {n}")
    if teacher is not None and teacher.config.text.vocab_size != config.text.vocab_size:
        raise ConfigError(f"teacher vocab_size {teacher.config.text.vocab_size} != student vocab_size "
                          f"{config.text.vocab_size}: codistillation needs the same vocabulary")
