"""Vision tower, pixel shuffle, projector, early fusion and the multimodal handle against transformers'
Llama4ForConditionalGeneration on a tiny random VLM (fp32), with its own tokenizer and images made on the spot."""

import json
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

import l4jax
from l4jax.cli import main
from l4jax.config import load_config
from l4jax.parallel import param_shardings, partitioning
from l4jax.checkpoints.hf_names import VISION_PREFIXES, vision_sources
from l4jax.data.images import ImageProcessor, encode_with_images
from l4jax import chat_prompt
from l4jax.data.tokenizer import Tokenizer
from l4jax.model.vision import (ImageEncoder, VisionModel, abstract_vision_params, merge_image_features, pixel_shuffle)
from tiny import CONFIGS, VISION, save_vlm

QUESTION = "What is in these pictures?"
NEW = 10


def rel(ours, ref) -> float:
    ref = np.asarray(ref, np.float64)
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """A tiny random Llama4ForConditionalGeneration with a tokenizer, a preprocessor config (28-px tiles, at most 6)
    and three images, saved in one folder (``tiny.save_vlm``)."""
    folder = tmp_path_factory.mktemp("vlm")
    model, paths = save_vlm(folder)
    return model, folder, Tokenizer(folder), paths


@pytest.fixture(scope="module")
def ours(vlm):
    return l4jax.load(vlm[1])


def pixels(n, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, 3, 28, 28)).astype(np.float32)


def chat_inputs(vlm, model):
    """The CLI's prompt: one user message with images 0 and 1, then QUESTION -> (ids [1, T], pixel_values)."""
    _, folder, tok, paths = vlm
    text = chat_prompt([{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                     {"type": "text", "text": QUESTION}]}])
    ids, px = encode_with_images(tok, text, paths[:2], model.config, ImageProcessor.from_folder(folder, 28))
    return np.array([ids]), px


@pytest.fixture(scope="module")
def hf_generated(vlm, ours):
    model, _, tok, _ = vlm
    ids, px = chat_inputs(vlm, ours)
    with torch.no_grad():
        out = model.generate(torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                             pixel_values=torch.tensor(px), max_new_tokens=NEW, do_sample=False,
                             eos_token_id=list(tok.stop_ids()), pad_token_id=tok.pad_id)
    return out.numpy()


# -- the tower, the shuffle and the projector, each against transformers --------------------------------------------
def test_vision_sources_cover_checkpoint(vlm, ours):
    keys = {s.key for s in vision_sources(ours.config.vision, ours.config.text.hidden_size)}
    assert keys == {k for k in vlm[0].state_dict() if k.startswith(VISION_PREFIXES)}


def test_vision_tower_matches_transformers(vlm, ours):
    px = pixels(3)
    with torch.no_grad():
        ref = vlm[0].vision_model(torch.tensor(px)).last_hidden_state.numpy()
    got = jax.jit(VisionModel(ours.config.vision).apply)({"params": ours.vision_params["vision_model"]}, px)
    assert got.shape == ref.shape == (3, ours.config.vision.tokens_per_tile, 48)
    assert rel(got, ref) <= 1e-5


def test_image_features_match_transformers_projector(vlm, ours):
    model = vlm[0]
    px = pixels(2, seed=1)
    with torch.no_grad():
        h = model.get_image_features(pixel_values=torch.tensor(px)).last_hidden_state
        ref = model.multi_modal_projector(h.reshape(-1, h.shape[-1])).numpy()
    got = jax.jit(ImageEncoder(ours.config.vision, 64).apply)({"params": ours.vision_params}, px)
    assert got.shape == ref.shape == (2 * 4, 64)
    assert rel(got, ref) <= 1e-5


def test_pixel_shuffle_matches_transformers():
    from transformers.models.llama4.modeling_llama4 import pixel_shuffle as hf_shuffle
    x = np.random.default_rng(0).standard_normal((3, 64, 12)).astype(np.float32)  # 8x8 grid
    np.testing.assert_array_equal(pixel_shuffle(jnp.asarray(x), 0.5), hf_shuffle(torch.tensor(x), 0.5).numpy())


def test_merge_counts_must_match():
    ids = np.array([[5, 299, 299, 7]])
    with pytest.raises(ValueError, match="2 image tokens.*3 feature rows"):
        merge_image_features(jnp.zeros((1, 4, 8)), ids, jnp.zeros((3, 8)), 299)
    out = merge_image_features(jnp.zeros((1, 4, 8)), ids, jnp.arange(16.0).reshape(2, 8), 299)
    np.testing.assert_array_equal(out[0, 1:3], np.arange(16.0).reshape(2, 8))
    np.testing.assert_array_equal(out[0, [0, 3]], 0)


def test_init_matches_checkpoint_layout(ours):
    """Random init has exactly the streamed tree and shapes, and every parameter carries logical axis names."""
    import flax.linen as nn
    c = ours.config
    boxed = abstract_vision_params(ImageEncoder(c.vision, c.text.hidden_size))
    assert jax.tree.map(lambda a: a.shape, nn.meta.unbox(boxed)) == jax.tree.map(lambda a: a.shape,
                                                                                 ours.vision_params)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(x, nn.LogicallyPartitioned) and len(x.names) == len(x.value.shape) for x in leaves)


def test_vision_shardings_follow_the_rules_and_replicate_what_does_not_divide():
    """tensor=8 divides the text's 8 heads but not the tower's 4: those vision dimensions are replicated."""
    config = load_config({"model_type": "llama4", "vision_config": VISION,
                          "text_config": dict(CONFIGS["top2"], num_attention_heads=8, num_key_value_heads=8)})
    shard = param_shardings(config, partitioning(config.text, l4jax.make_mesh(tensor=8)))
    attn = shard["vision_model"]["layers_0"]["attn"]
    # (embed -> fsdp, of size 1 here; heads: 4 of 8 -> replicated; head_dim)
    assert tuple(attn["q"].spec) == ("fsdp", None, None)
    assert tuple(shard["vision_model"]["layers_0"]["mlp"]["fc1"].spec) == ("fsdp", "tensor")  # 128 / 8
    assert tuple(shard["projector"]["kernel"].spec) == ("tensor", "fsdp")                      # 48 / 8


# -- the handle: l4jax.load of the full checkpoint ---------------------------------------------------------------
def test_handle_logits_match_transformers_with_two_images(vlm, ours):
    """A left-padded batch: row 0 holds a several-tile image (2 x 3 tiles + thumbnail) and a one-tile image, row 1
    one more image. Pixel values from l4jax.preprocess, weights through l4jax.load; fp32 logits within 1e-4."""
    model, folder, tok, paths = vlm
    proc = ImageProcessor.from_folder(folder, 28)
    rows = [("Compare <|image|> with <|image|> please", paths[:2]), ("and <|image|>?", paths[2:])]
    encoded = [encode_with_images(tok, text, ims, ours.config, proc) for text, ims in rows]
    assert proc.tiles(paths[0])[1] == (2, 3) and proc.tiles(paths[1])[1] == (1, 1)
    T = max(len(ids) for ids, _ in encoded)
    ids = np.array([[0] * (T - len(r)) + r for r, _ in encoded])
    mask = np.array([[0] * (T - len(r)) + [1] * len(r) for r, _ in encoded])
    px = np.concatenate([p for _, p in encoded])
    assert px.shape == (9, 3, 28, 28) and (ids == ours.config.image_token_index).sum() == 9 * 4
    with torch.no_grad():
        kw = {"attention_mask": torch.tensor(mask),
              "position_ids": torch.tensor(np.clip(mask.cumsum(-1) - 1, 0, None))}
        ref = model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px), **kw).logits.numpy()
        text_only = model(input_ids=torch.tensor(ids), **kw).logits.numpy()
    got = np.asarray(ours(ids, mask, pixel_values=px))
    sel = mask.astype(bool)
    assert np.abs(got - ref)[sel].max() / np.abs(ref[sel]).max() <= 1e-4
    assert np.abs(ref - text_only)[sel].max() > 1e-2  # the images do change the logits


def test_handle_errors(vlm, ours, tmp_path):
    ids, px = chat_inputs(vlm, ours)
    n = int((ids == ours.config.image_token_index).sum())
    assert n == 8 * 4  # 2 x 3 tiles + thumbnail, and one tile: 4 tokens each
    with pytest.raises(ValueError, match=rf"input_ids hold {n} image tokens .* but the images give {n - 4} feature "):
        ours(ids, pixel_values=px[:-1])
    with pytest.raises(ValueError, match=r"expected shape \[N, 3, 28, 28\] \(N tiles of 28x28 pixels\), got "
                                         r"\[8, 3, 32, 32\]"):
        ours(ids, pixel_values=np.zeros((8, 3, 32, 32), np.float32))
    for call in (lambda: ours(ids), lambda: ours.generate(ids, max_new_tokens=1)):  # placeholders, no images
        with pytest.raises(ValueError, match=rf"input_ids: {n} image placeholder tokens <\|patch\|> .* but no images"):
            call()
    text_only = l4jax.load(vlm[1], vision=False)
    assert text_only.vision_params is None and text_only.config.vision is None
    assert text_only.num_params() == sum(p.numel() for n, p in vlm[0].named_parameters() if "language_model" in n)
    with pytest.raises(ValueError, match="no vision tower: its config has no vision_config"):
        text_only.generate(ids, pixel_values=px)
    with pytest.raises(ValueError, match="vision=True, but the config has no vision_config"):
        l4jax.init(ours.config.text, vision=True)


def test_export_to_hf_gives_back_the_checkpoint_byte_for_byte(vlm, ours, tmp_path):
    """The vision tower, projector and text decoder exported as a llama4 folder: the same tensors as the source."""
    from safetensors.numpy import load_file
    ours.save_pretrained(tmp_path / "hf", side_files_from=vlm[1])
    ref, got = load_file(str(vlm[1] / "model.safetensors")), load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(ref) == sorted(got) and any(k.startswith("vision_model.") for k in got)
    assert all(ref[k].tobytes() == got[k].tobytes() for k in ref)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama4"
    assert l4jax.load(tmp_path / "hf").config == ours.config
    assert (tmp_path / "hf" / "preprocessor_config.json").is_file()


def test_a_converted_checkpoint_exports_the_same_bytes(vlm, tmp_path):
    """Through the l4jax format and back by the CLI (the export reads each stored parameter in blocks and places
    them: the vision tower's reshaped heads and biases too): the source's tensors byte for byte."""
    from safetensors.numpy import load_file
    assert main(["convert", "--from-hf", str(vlm[1]), "--to", str(tmp_path / "l4")]) == 0
    assert main(["convert", "--from-l4jax", str(tmp_path / "l4"), "--to-hf", str(tmp_path / "hf")]) == 0
    ref, got = load_file(str(vlm[1] / "model.safetensors")), load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(ref) == sorted(got) and any(k.startswith("vision_model.") for k in got)
    assert all(ref[k].tobytes() == got[k].tobytes() for k in ref)


def test_generate_with_images_equals_transformers(vlm, ours, hf_generated):
    """Greedy tokens of the chat prompt with two images (one of several tiles) equal transformers' generate."""
    ids, px = chat_inputs(vlm, ours)
    got = ours.generate(ids, pixel_values=px, max_new_tokens=NEW, stop_tokens=vlm[2].stop_ids())
    np.testing.assert_array_equal(got, hf_generated[:, :got.shape[1]])
    assert got.shape[1] == hf_generated.shape[1] or hf_generated[0, got.shape[1] - 1] in vlm[2].stop_ids()


def test_cli_generate_with_images(vlm, hf_generated, capsys):
    _, folder, tok, paths = vlm
    argv = ["generate", "--model", str(folder), "--prompt", QUESTION, "--chat", "--image", str(paths[0]),
            "--image", str(paths[1]), "--max-new-tokens", str(NEW)]
    assert main(argv) == 0
    expect = tok.decode(hf_generated[0, hf_generated.shape[1] - NEW:], skip_special_tokens=True)
    assert capsys.readouterr().out == expect + "\n" and len(expect) > 0
    (folder / "not-an-image.png").write_text("hello")
    assert main(argv[:-4] + ["--image", str(folder / "not-an-image.png")]) == 2
    assert "not-an-image.png: cannot read image" in capsys.readouterr().err
    Image.new("L", (1, 1)).save(folder / "bomb.png")
    raw = bytearray((folder / "bomb.png").read_bytes())
    at = raw.index(b"IHDR")
    raw[at + 4:at + 12] = (20000).to_bytes(4, "big") * 2  # a header claiming 20000 x 20000 pixels
    raw[at + 17:at + 21] = zlib.crc32(bytes(raw[at:at + 17])).to_bytes(4, "big")
    (folder / "bomb.png").write_bytes(bytes(raw))
    assert main(argv[:-4] + ["--image", str(folder / "bomb.png")]) == 2
    err = capsys.readouterr().err
    assert "bomb.png: cannot read image: Image size (400000000 pixels) exceeds" in err and err.count("\n") == 1
    # Prompt text cannot inject image placeholders; other control tokens parse as transformers parses them.
    assert main(["generate", "--model", str(folder), "--prompt", "<|patch|><|patch|> what is this?"]) == 2
    assert "2 image placeholder tokens <|patch|>" in capsys.readouterr().err
    assert main(["generate", "--model", str(folder), "--prompt", "hi<|eot|>", "--max-new-tokens", "2"]) == 0


@pytest.mark.slow
def test_mesh_and_converted_checkpoint(vlm, ours, tmp_path, capsys):
    """On a data=2 x tensor=4 mesh the multimodal logits and greedy tokens equal one device's; an l4jax checkpoint
    converted from the HF folder holds the vision tower, and loads with or without it."""
    ids, px = chat_inputs(vlm, ours)
    sharded = l4jax.load(vlm[1], mesh=l4jax.make_mesh(data=2, tensor=4))
    assert rel(sharded(ids, pixel_values=px), ours(ids, pixel_values=px)) <= 1e-5
    np.testing.assert_array_equal(sharded.generate(ids, pixel_values=px, max_new_tokens=4),
                                  ours.generate(ids, pixel_values=px, max_new_tokens=4))
    assert main(["convert", "--from-hf", str(vlm[1]), "--to", str(tmp_path / "l4")]) == 0
    converted = l4jax.load(tmp_path / "l4")
    jax.tree.map(np.testing.assert_array_equal, converted.vision_params, ours.vision_params)
    assert (tmp_path / "l4" / "preprocessor_config.json").is_file()
    assert l4jax.load(tmp_path / "l4", vision=False).vision_params is None
    ours.save(tmp_path / "saved")
    jax.tree.map(np.testing.assert_array_equal, l4jax.load(tmp_path / "saved").vision_params, ours.vision_params)
