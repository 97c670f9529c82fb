"""Image preprocessing and prompt expansion against transformers' Llama4ImageProcessor / Llama4Processor.

There is no torchvision for the pinned CPU torch (its wheel needs CUDA torch's operators), so the processor class
itself cannot run here. Instead:
- canvas choice and resize targets are compared with transformers' own functions (``find_supported_resolutions``,
  ``get_best_fit``, ``get_max_res_without_distortion``, composed as ``Llama4ImageProcessor._preprocess`` does);
  their module imports torchvision only for resize/pad, so a placeholder module stands in for it during the import;
- the bf16 normalisation is compared with the same torch operations the reference runs;
- pixel values are checked on hand-computed cases (images that need no resize, solid colours, transparency);
- the resize is compared with ``torch.nn.functional.interpolate(uint8, antialias=True)``, the kernel torchvision's
  resize calls for uint8 images on AVX2 CPUs, to within one intensity level.
"""

import importlib
import sys
import types

import numpy as np
import pytest
import torch

from l4jax.data.images import (ImageError, ImageProcessor, best_canvas, canvases, expand_images, image_tokens,
                              load_image, message_images, normalize_table, resize_target)


@pytest.fixture(scope="module")
def ref():
    """transformers.models.llama4.image_processing_llama4, imported with a placeholder torchvision."""
    import transformers.image_processing_backends  # noqa: F401  (decides torchvision is absent, before the stub)
    names = ["torchvision", "torchvision.transforms", "torchvision.transforms.v2",
             "torchvision.transforms.v2.functional"]
    saved = {n: sys.modules.get(n) for n in names}
    try:
        for n in names:
            sys.modules[n] = types.ModuleType(n)
        sys.modules["torchvision.transforms.v2"].functional = sys.modules["torchvision.transforms.v2.functional"]
        return importlib.import_module("transformers.models.llama4.image_processing_llama4")
    finally:
        for n, module in saved.items():
            if module is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = module


def reference_sizes(ref, H, W, tile=336, max_patches=16, resize_to_max_canvas=False):
    """(canvas, resized size) exactly as Llama4ImageProcessor._preprocess computes them (torch tensors and all)."""
    from transformers.image_utils import SizeDict
    size = SizeDict(height=tile, width=tile)
    ref.find_supported_resolutions.cache_clear()
    options = torch.tensor(ref.find_supported_resolutions(max_num_chunks=max_patches, patch_size=size))
    image_size = torch.Size([H, W])
    canvas = ref.get_best_fit(image_size, options, resize_to_max_canvas=resize_to_max_canvas)
    target = canvas if resize_to_max_canvas else (min(max(H, tile), canvas[0]), min(max(W, tile), canvas[1]))
    h, w = ref.get_max_res_without_distortion(image_size, target)
    return (int(canvas[0]), int(canvas[1])), (max(int(h), 1), max(int(w), 1))


# Sizes where floor(side * scale) depends on the reference computing the scale in float32 (found by search).
FLOAT32_EDGES = [(5053, 496), (3199, 1828), (552, 5244), (3300, 1375), (4819, 1264)]


@pytest.mark.parametrize("tile,max_patches", [(336, 16), (336, 4), (28, 16)])
def test_canvases_equal_reference(ref, tile, max_patches):
    from transformers.image_utils import SizeDict
    ref.find_supported_resolutions.cache_clear()
    expect = ref.find_supported_resolutions(max_num_chunks=max_patches, patch_size=SizeDict(height=tile, width=tile))
    assert canvases(max_patches, tile) == [tuple(c) for c in expect]
    if (tile, max_patches) == (336, 16):
        assert len(canvases(16, 336)) == 50  # every rows x cols <= 16


@pytest.mark.parametrize("tile,max_patches,to_max",
                         [(336, 16, False), (336, 16, True), (28, 16, False), (336, 4, False)])
def test_canvas_and_resize_equal_reference(ref, tile, max_patches, to_max):
    rng = np.random.default_rng(tile + max_patches + to_max)
    sizes = [(1, 1), (1, 5000), (5000, 1), (tile, tile), (tile + 1, tile), (600, 1000), (1080, 1920), (200, 300)]
    sizes += FLOAT32_EDGES + [tuple(int(v) for v in s) for s in rng.integers(1, 4000, (300, 2))]
    sizes += [tuple(int(v) for v in s) for s in rng.integers(1, 3 * tile, (300, 2))]
    for H, W in sizes:
        canvas = best_canvas(H, W, max_patches=max_patches, tile=tile, resize_to_max_canvas=to_max)
        got = canvas, resize_target(H, W, canvas, tile=tile, resize_to_max_canvas=to_max)
        assert got == reference_sizes(ref, H, W, tile, max_patches, to_max), (H, W)


def test_documented_examples():
    """The reference's worked examples (llama4-reference.md 4.1)."""
    assert best_canvas(600, 1000) == (672, 1008) and resize_target(600, 1000, (672, 1008)) == (600, 1000)
    assert best_canvas(1080, 1920) == (1008, 1680) and resize_target(1080, 1920, (1008, 1680)) == (945, 1680)
    assert best_canvas(200, 300) == (336, 336) and resize_target(200, 300, (336, 336)) == (224, 336)


def test_normalisation_equals_reference_bf16_ops():
    """Every 8-bit value through the reference's ops: bf16(v) * (1/255), then torchvision's normalize on bf16
    tensors (sub, div with bf16 mean/std); also a non-default mean/std/rescale."""
    v = torch.arange(256, dtype=torch.uint8)
    for rescale, mean, std in [(1 / 255, (0.5,) * 3, (0.5,) * 3), (1 / 256, (0.48, 0.45, 0.41), (0.27, 0.26, 0.28))]:
        x = v.to(torch.bfloat16) * rescale
        expect = [x.sub(torch.tensor(m, dtype=torch.bfloat16)).div(torch.tensor(s, dtype=torch.bfloat16)).float()
                  for m, s in zip(mean, std)]
        np.testing.assert_array_equal(normalize_table(rescale, mean, std), torch.stack(expect).numpy())
    table = normalize_table()
    # By hand: 128/255 = 0.50196 rounds to the bf16 0.50390625 (steps of 2^-8 there), minus 0.5, times 2.
    assert table[0, 0] == -1.0 and table[0, 255] == 1.0 and table[0, 128] == 0.0078125


def test_tiles_of_an_image_that_needs_no_resize():
    """600x1000 fits a 672x1008 canvas as it is: 2 x 3 tiles of the normalised image padded with -1, then the
    thumbnail. By hand, with no resampling involved."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (600, 1000, 3), dtype=np.uint8)
    px, grid = ImageProcessor().tiles(img)
    assert grid == (2, 3) and px.shape == (7, 3, 336, 336) and px.dtype == np.float32
    canvas = np.full((3, 672, 1008), -1.0, np.float32)
    canvas[:, :600, :1000] = normalize_table()[np.arange(3)[:, None, None], img.transpose(2, 0, 1)]
    for r in range(2):
        for c in range(3):
            np.testing.assert_array_equal(px[r * 3 + c], canvas[:, r * 336:(r + 1) * 336, c * 336:(c + 1) * 336])


def test_single_tile_has_no_thumbnail_and_solid_colours_stay_exact():
    table = normalize_table()
    img = np.zeros((200, 300, 3), np.uint8) + np.array([10, 128, 250], np.uint8)
    px, grid = ImageProcessor().tiles(img)  # resized to 224 x 336, padded below
    assert grid == (1, 1) and px.shape == (1, 3, 336, 336)
    for ch, v in enumerate([10, 128, 250]):
        assert (px[0, ch, :224] == table[ch, v]).all() and (px[0, ch, 224:] == -1).all()
    big, grid = ImageProcessor().tiles(np.zeros((700, 700, 3), np.uint8) + 77)  # 3 x 3 canvas, thumbnail squashed
    assert grid == (3, 3) and big.shape == (10, 3, 336, 336) and (big[-1] == table[0, 77]).all()


def test_resize_within_one_level_of_torch_uint8_kernel():
    """Pillow's antialiased bilinear resize against torch's uint8 antialiased bilinear (what torchvision runs):
    the full tiles of a downscaled image differ by at most one intensity level, in few pixels."""
    y, x = np.mgrid[0:1500, 0:900]
    img = np.stack([(x * 7 + y) % 256, (x * y) % 251, (x // 3 + y // 5) % 256], -1).astype(np.uint8)
    proc = ImageProcessor(max_patches=4)
    px, (rows, cols) = proc.tiles(img)
    canvas = best_canvas(1500, 900, max_patches=4)
    h, w = resize_target(1500, 900, canvas)
    t = torch.nn.functional.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None], size=(h, w), mode="bilinear",
                                        antialias=True)[0].permute(1, 2, 0).numpy()
    padded = np.zeros(canvas + (3,), np.uint8)
    padded[:h, :w] = t
    expect = normalize_table()[np.arange(3)[:, None, None], padded.transpose(2, 0, 1)]
    expect = expect.reshape(3, rows, 336, cols, 336).transpose(1, 3, 0, 2, 4).reshape(rows * cols, 3, 336, 336)
    diff = np.abs(px[:rows * cols] - expect)
    one_level = np.abs(np.diff(normalize_table(), axis=1)).max()  # the largest step between neighbouring levels
    assert diff.max() <= one_level
    assert (diff > 0).mean() < 0.1


def test_transparency_is_white_and_modes_convert(tmp_path):
    from PIL import Image
    rgba = np.zeros((40, 50, 4), np.uint8)  # fully transparent black
    assert (np.asarray(load_image(rgba)) == 255).all()
    Image.fromarray(np.full((30, 20), 9, np.uint8)).save(tmp_path / "grey.png")
    im = load_image(tmp_path / "grey.png")
    assert im.mode == "RGB" and im.size == (20, 30) and (np.asarray(im) == 9).all()


def test_unreadable_and_missing_image_files(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(ImageError, match=r"broken\.png: cannot read image"):
        ImageProcessor()([bad])
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match=r"expected uint8 \[H, W\], \[H, W, 3\] or \[H, W, 4\], got float64 "
                                         r"\[4, 4, 3\]"):
        load_image(np.zeros((4, 4, 3)))


def test_a_decompression_bomb_is_refused_by_name(tmp_path):
    """A PNG whose header claims 20000 x 20000 pixels (400 M, past Pillow's limit): refused before decoding."""
    import struct
    import zlib
    from PIL import Image
    small = tmp_path / "small.png"
    Image.new("L", (1, 1)).save(small)
    raw = bytearray(small.read_bytes())
    ihdr = raw.index(b"IHDR")
    raw[ihdr + 4:ihdr + 12] = struct.pack(">II", 20000, 20000)
    raw[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(raw[ihdr:ihdr + 17])))
    (tmp_path / "bomb.png").write_bytes(bytes(raw))
    with pytest.raises(ImageError, match=r"bomb\.png: cannot read image: Image size \(400000000 pixels\) exceeds"):
        load_image(tmp_path / "bomb.png")


def test_prompt_expansion_equals_llama4processor():
    from transformers.models.llama4.processing_llama4 import Llama4Processor
    for grid in [(1, 1), (2, 3), (3, 1)]:
        assert image_tokens(*grid, 144) == Llama4Processor._prompt_split_image(None, grid, 144)
    # By hand, 2 x 2 tiles of 2 tokens:
    P = "<|patch|>" * 2
    assert image_tokens(2, 2, 2) == ("<|image_start|>" + P + "<|tile_x_separator|>" + P + "<|tile_y_separator|>"
                                     + P + "<|tile_x_separator|>" + P + "<|tile_y_separator|>"
                                     + "<|image|>" + P + "<|image_end|>")
    text = expand_images("a<|image|>b<|image|>c", [(1, 1), (1, 2)], 1)
    assert text == ("a<|image_start|><|image|><|patch|><|image_end|>b<|image_start|><|patch|><|tile_x_separator|>"
                    "<|patch|><|tile_y_separator|><|image|><|patch|><|image_end|>c")


def test_placeholder_count_mismatch_states_both_numbers():
    with pytest.raises(ValueError, match=r"the prompt has 1 <\|image\|> placeholder\(s\) but 2 image\(s\) were given"):
        expand_images("look: <|image|>", [(1, 1), (2, 2)], 4)


def test_message_images_in_order():
    messages = [{"role": "user", "content": [{"type": "image", "path": "a.png"}, {"type": "text", "text": "x"},
                                             {"type": "image", "image": "b.png"}]},
                {"role": "assistant", "content": "ok"}]
    assert message_images(messages) == ["a.png", "b.png"]
    with pytest.raises(ValueError, match="message 0: image part without"):
        message_images([{"role": "user", "content": [{"type": "image"}]}])
