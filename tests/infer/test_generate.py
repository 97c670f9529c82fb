"""KV cache and generation: prefill + decode equals the full forward at every step, greedy tokens equal
transformers' generate, the ring buffer size, streaming and input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import l4jax
from l4jax.infer.generate import _decode, _prefill, generate, stream
from l4jax.model import Inputs, KVCache
from l4jax.model.kernels import Kernels
from tiny import batch, hf_model, save

NEW = 34  # > 4 chunks of 8 past the prompt


@pytest.fixture(scope="module", params=["scout", "top2"])
def pair(request, tmp_path_factory):
    model = hf_model(request.param, seed=7)
    return model, l4jax.load(save(model, tmp_path_factory.mktemp(request.param)))


PROMPT = batch(lengths=(11, 6, 3), seed=1)[:2]  # one shape for every generate call: compiled once per model


@pytest.fixture(scope="module")
def free_run(pair):
    """Greedy tokens with no stop token, [3, 11 + NEW]."""
    return generate(pair[1], *PROMPT, max_new_tokens=NEW, stop_tokens=())


def test_greedy_tokens_equal_transformers_generate(pair, free_run):
    hf, _ = pair
    ids, mask = PROMPT
    with torch.no_grad():
        ref = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=NEW,
                          min_new_tokens=NEW, do_sample=False, pad_token_id=0).numpy()
    assert free_run.shape == ref.shape == (3, 11 + NEW)
    np.testing.assert_array_equal(free_run, ref)


def test_prefill_then_decode_logits_equal_full_forward(pair):
    """Run the cache one token at a time (after a prompt) and compare every step's logits with one full forward."""
    _, ours = pair
    cfg = ours.config.text
    ids, mask, _ = batch(lengths=(13, 5), seed=2)
    rng = np.random.default_rng(0)
    T, extra = ids.shape[1], 20
    full_ids = np.concatenate([ids, rng.integers(3, 300, size=(2, extra))], axis=1)
    full_mask = np.pad(mask, ((0, 0), (0, extra)), constant_values=1)
    ref = np.asarray(ours(full_ids, full_mask))
    apply = jax.jit(lambda p, i, c: ours.module.apply({"params": p}, Inputs(i, jnp.asarray(full_mask)), c))
    out = apply(ours.params, jnp.asarray(ids), KVCache.init(cfg, 2, T + extra))
    steps = [np.asarray(out.logits)]
    for t in range(T, T + extra):
        assert int(out.cache.pos) == t
        out = apply(ours.params, jnp.asarray(full_ids[:, t:t + 1]), out.cache)
        steps.append(np.asarray(out.logits))
    got = np.concatenate(steps, axis=1)
    sel = full_mask.astype(bool)
    assert np.abs(got - ref)[sel].max() <= 1e-5 * np.abs(ref[sel]).max()


def test_prefill_in_pieces_by_query_blocks_equals_full_forward(pair):
    """A prompt prefilled in two pieces (the second onto a cache already holding the first, across chunk
    boundaries), with the dense path scoring 4 queries at a time and the chunked layers blockwise: the logits of
    every token equal one full forward's."""
    _, ours = pair
    ids, mask, _ = batch(lengths=(30, 19), seed=3)
    ref = np.asarray(ours(ids, mask))
    module = ours.module.clone(kernels=Kernels(query_block=4))
    apply = jax.jit(lambda p, i, c: module.apply({"params": p}, Inputs(i, jnp.asarray(mask)), c))
    first = apply(ours.params, jnp.asarray(ids[:, :17]), KVCache.init(ours.config.text, 2, 30))
    second = apply(ours.params, jnp.asarray(ids[:, 17:]), first.cache)
    got = np.concatenate([np.asarray(first.logits), np.asarray(second.logits)], axis=1)
    sel = mask.astype(bool)
    assert np.abs(got - ref)[sel].max() <= 1e-5 * np.abs(ref[sel]).max()


def test_ring_buffer_holds_exactly_chunk_entries():
    cfg = l4jax.load_config("scout").text
    cache = KVCache.abstract(cfg, 1, 65536, jnp.bfloat16)
    for i in range(cfg.num_hidden_layers):
        want = cfg.attention_chunk_size if cfg.chunked_layers[i] else 65536
        assert cache.k[i].shape == (1, 8, want, 128) and cache.v[i].shape == (1, 8, 128, want)
    full = 48 * 65536
    ours = sum(cache.length(i) for i in range(48))
    assert ours / full == pytest.approx((12 * 65536 + 36 * 8192) / full)  # 0.34: ~2/3 less at 64k, -> 1/4 at 1M


def test_stop_tokens_stream_and_callback(pair, free_run):
    _, ours = pair
    ids, mask = PROMPT
    T = ids.shape[1]
    first = int(free_run[0, T])  # row 0 stops at its first new token; the others run until they emit it
    seen = []
    got = generate(ours, ids, mask, max_new_tokens=NEW, stop_tokens=[first], callback=seen.append)
    assert len(seen) == got.shape[1] - T and np.array_equal(np.stack(seen, 1), got[:, T:])
    for row in range(3):
        hits = np.flatnonzero(free_run[row, T:] == first)
        n = hits[0] + 1 if hits.size else NEW
        np.testing.assert_array_equal(got[row, T:T + n], free_run[row, T:T + n])
        assert (got[row, T + n:] == 0).all()  # padded after its stop token
    it = stream(ours, ids, mask, max_new_tokens=NEW, stop_tokens=())
    assert [next(it).tolist() for _ in range(3)] == free_run[:, T:T + 3].T.tolist()


def test_generate_errors(pair):
    _, ours = pair
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 300\)"):
        generate(ours, [[1, 300]])
    with pytest.raises(ValueError, match="non-empty"):
        generate(ours, np.zeros((1, 0), int))
    with pytest.raises(ValueError, match=r"rows \[1\] are empty"):
        generate(ours, [[1, 2], [0, 0]], [[1, 1], [0, 0]])
    with pytest.raises(ValueError, match="prompt length 5 leaves no room under max_length 5"):
        generate(ours, [[1, 2, 3, 4, 5]], max_length=5)
    with pytest.raises(ValueError, match=r"unknown token ids \[999\]"):
        generate(ours, [[1, 2]], stop_tokens=[2, 999])
    with pytest.raises(ValueError, match="max_new_tokens: must be a positive integer, got -5"):
        generate(ours, [[1, 2]], max_new_tokens=-5)
    with pytest.raises(ValueError, match=r"attention_mask: rows \[0\] have padding after a token"):
        generate(ours, [[1, 2, 0]], [[1, 1, 0]])  # right padding
    with pytest.raises(ValueError, match=r"attention_mask: values must be 0 \(padding\) or 1"):
        generate(ours, [[1, 2]], [[1, 2]])
    with pytest.raises(ValueError, match="kv_dtype"):
        generate(ours, [[1, 2]], kv_dtype="float8")


def test_decode_step_compiles_once_per_shape_not_per_token(pair):
    _, ours = pair
    before = _decode._cache_size(), _prefill._cache_size()
    # A shape no other test uses; 40 tokens take 3 device calls (1, then up to 32, then 7): one compiled loop.
    out = generate(ours, [[5, 6, 7, 8, 9]], max_new_tokens=40, stop_tokens=())
    assert out.shape == (1, 45)
    assert (_decode._cache_size(), _prefill._cache_size()) == (before[0] + 1, before[1] + 1)
