"""Images to Llama 4 pixel tiles (numpy and Pillow, no torch) and the prompt expansion of ``<|image|>``.

What transformers' ``Llama4ImageProcessor`` and ``Llama4Processor`` do, step by step (S = tile side, 336 for the
released models; ``max_patches`` = 16):

1. Canvas: among every (rows S, cols S) with rows * cols <= max_patches, the one that needs the least resizing
   (``best_canvas``: the smallest scale >= 1 if some canvas lets the image grow, else the largest below 1; ties
   go to the smallest area).
2. Resize without distortion (``resize_target``): never upscale past max(image side, S), keep the aspect ratio,
   then pad at the bottom and right with black up to the canvas.
3. Normalise: ``(x / 255 - mean) / std`` rounded to bfloat16 at each step, as the reference computes it in bf16
   (pad pixels become -1 with the default mean = std = 0.5).
4. Tiles: the canvas cut into rows x cols tiles of S x S, row-major; when there is more than one tile, a global
   thumbnail (the original image squashed to S x S, aspect ratio not kept) follows them.
5. Prompt: each ``<|image|>`` placeholder becomes ``<|image_start|>``, per tile row the tiles' ``<|patch|>`` runs
   separated by ``<|tile_x_separator|>`` and closed by ``<|tile_y_separator|>`` (only when there are several
   tiles), then ``<|image|>`` and the thumbnail's (or single tile's) patches, then ``<|image_end|>``.

Pixel values come out as float32 arrays [N, 3, S, S] (N = tiles of all images, in order) holding the bf16 values.
Resizing uses Pillow's antialiased bilinear filter, which torchvision's ``antialias=True`` was modelled on: the
reference's own resize differs between CPUs (an integer kernel with AVX2, a float one without) and Pillow stays
within one intensity level (of 255) of both.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import ml_dtypes
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .tokenizer import IMAGE

IMAGE_START, IMAGE_END = "<|image_start|>", "<|image_end|>"
PATCH = "<|patch|>"
TILE_X, TILE_Y = "<|tile_x_separator|>", "<|tile_y_separator|>"

ImageLike = Union[str, Path, np.ndarray, Image.Image]


class ImageError(ValueError):
    """An image that cannot be read or used; the message names it."""


# -- canvas and resize (the reference's arithmetic, including where it rounds in float32) --------------------------
def canvases(max_patches: int, tile: int) -> list[tuple[int, int]]:
    """Every (rows * tile, cols * tile) canvas with rows * cols <= max_patches, in the reference's order.

    The order decides ties in ``best_canvas``: grids of each tile count n (n from max_patches down) by ascending
    rows, grouped by aspect ratio rows / cols in the order each ratio first appears.
    """
    if max_patches < 1 or tile < 1:
        raise ValueError(f"max_patches and tile must be positive, got {max_patches} and {tile}")
    groups: dict[float, list[tuple[int, int]]] = {}
    for n in range(max_patches, 0, -1):
        for rows in sorted(r for r in range(1, n + 1) if n % r == 0):
            groups.setdefault(rows / (n // rows), []).append((rows, n // rows))
    return [(r * tile, c * tile) for grids in groups.values() for r, c in grids]


def best_canvas(height: int, width: int, *, max_patches: int = 16, tile: int = 336,
                resize_to_max_canvas: bool = False) -> tuple[int, int]:
    """The canvas (height, width) in pixels, a multiple of ``tile`` on both sides, for an image of this size.

    Each canvas allows the scale min(canvas_h / height, canvas_w / width) without distortion. If some canvas lets
    the image grow (scale >= 1), take the smallest such scale (the largest with ``resize_to_max_canvas``); else
    the largest scale below 1. Of the canvases with that scale, the smallest area (first in ``canvases`` order).
    Scales are float32, as the reference computes them on integer torch tensors: ties are decided on those values.
    """
    if height < 1 or width < 1:
        raise ImageError(f"image of size {height}x{width}: both sides must be at least one pixel")
    options = canvases(max_patches, tile)
    scales = [min(np.float32(ch) / np.float32(height), np.float32(cw) / np.float32(width)) for ch, cw in options]
    up = [s for s in scales if s >= 1]
    chosen = (max(up) if resize_to_max_canvas else min(up)) if up else max(scales)
    best = None
    for (ch, cw), s in zip(options, scales):
        if s == chosen and (best is None or ch * cw < best[0] * best[1]):
            best = (ch, cw)
    return best


def _div(a: int, b: int, f32: bool):
    return np.float32(a) / np.float32(b) if f32 else a / b


def resize_target(height: int, width: int, canvas: tuple[int, int], *, tile: int = 336,
                  resize_to_max_canvas: bool = False) -> tuple[int, int]:
    """(height, width) to resize the image to: as large as fits the canvas without distortion, but (unless
    ``resize_to_max_canvas``) never larger than max(side, tile) on either side, so small images are not blown up.

    The limiting side takes the target exactly; the other is floor(side * scale). The reference computes that
    scale in float32 where the target side comes from the canvas (a torch tensor) and in float64 where it comes
    from the image (a Python int); both are reproduced, since they can land on either side of an integer.
    """
    limits = []
    for side, c in zip((height, width), canvas):
        if resize_to_max_canvas:
            limits.append((c, True))
        else:
            cap = max(side, tile)
            limits.append((c, True) if c < cap else (cap, False))
    (th, th32), (tw, tw32) = limits
    sw, sh = _div(tw, width, tw32), _div(th, height, th32)
    mixed = tw32 or th32  # a float32 tensor compared with a Python float compares in float32
    if (np.float32(sw) < np.float32(sh)) if mixed else sw < sh:
        h, w = min(math.floor(np.float32(height) * sw if tw32 else height * sw), th), tw
    else:
        h, w = th, min(math.floor(np.float32(width) * sh if th32 else width * sh), tw)
    return max(int(h), 1), max(int(w), 1)


# -- pixels --------------------------------------------------------------------------------------------------------
def normalize_table(rescale: float = 1 / 255, mean: Sequence[float] = (0.5,) * 3,
                    std: Sequence[float] = (0.5,) * 3) -> np.ndarray:
    """[C, 256] float32: the normalised value of each 8-bit intensity per channel, rounded as the reference does.

    The reference computes ``(bf16(v) * rescale - bf16(mean)) / bf16(std)`` on bfloat16 tensors: each operation in
    float32, rounded back to bf16. A lookup table reproduces that exactly for all 256 inputs.
    """
    bf16 = ml_dtypes.bfloat16
    v = np.arange(256, dtype=np.float32).astype(bf16).astype(np.float32)
    x = (v * np.float32(rescale)).astype(bf16).astype(np.float32)
    rows = []
    for m, s in zip(mean, std):
        m32, s32 = (np.float32(np.float32(t).astype(bf16)) for t in (m, s))
        rows.append(((x - m32).astype(bf16).astype(np.float32) / s32).astype(bf16).astype(np.float32))
    return np.stack(rows)


def load_image(source: ImageLike):
    """A path, a Pillow image or a uint8 array [H, W] / [H, W, 3 or 4] -> an RGB Pillow image.

    Files are turned upright by their EXIF orientation (as transformers' loaders do). Transparency is composited
    onto white, as transformers' RGB conversion does; other modes convert with Pillow's ``convert("RGB")``.
    """

    if isinstance(source, (str, Path)):
        try:
            with Image.open(source) as f:
                image = ImageOps.exif_transpose(f)
                image.load()
        except FileNotFoundError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            raise ImageError(f"{source}: cannot read image: {e}") from e
    elif isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (2, 3) or (source.ndim == 3 and source.shape[-1] not in
                                                                      (3, 4)):
            raise ImageError(f"image array: expected uint8 [H, W], [H, W, 3] or [H, W, 4], got {source.dtype} "
                             f"{list(source.shape)}")
        image = Image.fromarray(source)
    elif isinstance(source, Image.Image):
        image = source
    else:
        raise ImageError(f"image: expected a path, a PIL image or a uint8 array, got {type(source).__name__}")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """Settings of ``Llama4ImageProcessor`` that change the output; ``__call__`` turns images into tiles."""

    tile: int = 336
    max_patches: int = 16
    resize_to_max_canvas: bool = False
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @classmethod
    def from_folder(cls, folder: str | Path, tile: int) -> ImageProcessor:
        """Settings from a model folder's ``preprocessor_config.json`` when present; ``tile`` is the vision
        config's image_size (the only tile size the vision tower accepts)."""
        f = Path(folder) / "preprocessor_config.json"
        d: dict[str, Any] = json.loads(f.read_text()) if f.is_file() else {}
        size = d.get("size") or {}
        if size and (size.get("height"), size.get("width")) != (tile, tile):
            raise ValueError(f"{f}: size {size} does not match the vision tower's image_size {tile}")
        kw = {k: d[k] for k in ("max_patches", "resize_to_max_canvas", "rescale_factor") if d.get(k) is not None}
        kw.update({k: tuple(d[k]) for k in ("image_mean", "image_std") if d.get(k) is not None})
        return cls(tile=tile, **kw)

    def tiles(self, source: ImageLike) -> tuple[np.ndarray, tuple[int, int]]:
        """One image -> (pixels [n, 3, S, S] float32, (rows, cols)); n = rows * cols, plus 1 for the thumbnail
        when rows * cols > 1."""

        image = load_image(source)
        W, H = image.size
        S = self.tile
        ch, cw = best_canvas(H, W, max_patches=self.max_patches, tile=S, resize_to_max_canvas=self.resize_to_max_canvas)
        h, w = resize_target(H, W, (ch, cw), tile=S, resize_to_max_canvas=self.resize_to_max_canvas)
        canvas = np.zeros((ch, cw, 3), np.uint8)  # padding is black (0) before normalisation
        canvas[:h, :w] = np.asarray(image.resize((w, h), Image.Resampling.BILINEAR))
        rows, cols = ch // S, cw // S
        table = normalize_table(self.rescale_factor, self.image_mean, self.image_std)

        def norm(a):  # [h, w, 3] uint8 -> [3, h, w] normalised, one table lookup per channel
            return table[np.arange(3)[:, None, None], a.transpose(2, 0, 1)]

        px = norm(canvas).reshape(3, rows, S, cols, S).transpose(1, 3, 0, 2, 4).reshape(rows * cols, 3, S, S)
        if rows * cols > 1:
            thumb = norm(np.asarray(image.resize((S, S), Image.Resampling.BILINEAR)))
            px = np.concatenate([px, thumb[None]])
        return px, (rows, cols)

    def __call__(self, images: Sequence[ImageLike]) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Images -> (pixel_values [N, 3, S, S] float32, (rows, cols) per image): all tiles of all images in
        order, each image's tiles row-major and then its thumbnail."""
        out = [self.tiles(im) for im in images]
        if not out:
            return np.zeros((0, 3, self.tile, self.tile), np.float32), []
        return np.concatenate([px for px, _ in out]), [grid for _, grid in out]


# -- prompt --------------------------------------------------------------------------------------------------------
def image_tokens(rows: int, cols: int, tokens_per_tile: int) -> str:
    """What one ``<|image|>`` placeholder becomes for an image of rows x cols tiles (see the module docstring)."""
    out = [IMAGE_START]
    if rows * cols > 1:
        for _ in range(rows):
            out.append(TILE_X.join([PATCH * tokens_per_tile] * cols))
            out.append(TILE_Y)
    out += [IMAGE, PATCH * tokens_per_tile, IMAGE_END]
    return "".join(out)


def expand_images(text: str, grids: Sequence[tuple[int, int]], tokens_per_tile: int) -> str:
    """Replace the k-th ``<|image|>`` of ``text`` by ``image_tokens(*grids[k])``. Counts must match."""
    parts = text.split(IMAGE)
    if len(parts) - 1 != len(grids):
        raise ValueError(f"the prompt has {len(parts) - 1} {IMAGE} placeholder(s) but {len(grids)} image(s) were "
                         f"given; put one {IMAGE} in the prompt per image (chat_prompt does for image parts)")
    out = [parts[0]]
    for (rows, cols), rest in zip(grids, parts[1:]):
        out += [image_tokens(rows, cols, tokens_per_tile), rest]
    return "".join(out)


def encode_with_images(tokenizer, text: str, images: Sequence[ImageLike], config,
                       processor: ImageProcessor | None = None) -> tuple[list[int], np.ndarray]:
    """A prompt with one ``<|image|>`` per image (``chat_prompt`` renders image parts so) -> (token ids with BOS,
    pixel_values [N, 3, S, S]), as transformers' ``Llama4Processor`` makes them for ``Llama4ForConditionalGeneration``.

    ``tokenizer`` is an ``l4jax.tokenizer.Tokenizer``, ``config`` the model's ``Llama4Config`` (its vision tile size
    and ``image_token_index``); ``processor`` defaults to ``ImageProcessor(tile=config.vision.image_size)``.
    """

    if config.vision is None:
        raise ValueError("images given, but the model has no vision tower (its config has no vision_config)")
    patch = tokenizer.token_id(PATCH)
    if patch != config.image_token_index:
        raise ValueError(f"the tokenizer's {PATCH} is id {patch} but the model's image_token_index is "
                         f"{config.image_token_index}: tokenizer and model do not belong together")
    processor = processor or ImageProcessor(tile=config.vision.image_size)
    pixels, grids = processor(images)
    return tokenizer.encode(expand_images(text, grids, config.vision.tokens_per_tile)), pixels


def message_images(messages: Sequence[Mapping[str, Any]]) -> list[Any]:
    """The images of a conversation's image parts, in order: each part's ``image``, ``path`` or ``url`` field
    (local paths only; nothing is downloaded)."""
    found = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, Mapping) else None
        for part in content if isinstance(content, (list, tuple)) else ():
            if isinstance(part, Mapping) and part.get("type") == "image":
                src = next((part[k] for k in ("image", "path", "url") if part.get(k) is not None), None)
                if src is None:
                    raise ValueError(f"message {i}: image part without 'image', 'path' or 'url': {part!r}")
                found.append(src)
    return found


__all__ = [
    "ImageError",
    "ImageProcessor",
    "best_canvas",
    "canvases",
    "encode_with_images",
    "expand_images",
    "image_tokens",
    "load_image",
    "message_images",
    "normalize_table",
    "resize_target",
]
