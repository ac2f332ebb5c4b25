"""Per-example image transforms in NumPy (uint8 (H, W, C) in, uint8 or float32 out).

* ImageNet (the reference's torchvision pipeline): RandomResizedCrop (scale 0.08-1, aspect ratio
  3/4-4/3, bilinear) + horizontal flip for training; resize of the shorter side + centre crop for
  evaluation. Resizing uses Pillow's bilinear filter, as torchvision does on PIL images.
* CIFAR: the AutoAugment CIFAR-10 policy (Cubuk et al. 2019; the 25 sub-policies and magnitude
  bins of torchvision's `AutoAugment(AutoAugmentPolicy.CIFAR10)`, which the reference uses for
  CIFAR-10 and CIFAR-100), every operation written here in NumPy with Pillow's pixel semantics
  (the tests compare them with Pillow). Geometric operations use nearest-neighbour sampling and
  fill with black, as torchvision's defaults.
* Normalisation: /255, then (x - mean) / std per channel.

Every random choice comes from the `np.random.Generator` passed in, so an example's augmentation
is a pure function of (seed, index) in the grain pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

Array = np.ndarray

# ------------------------------------------------------------------------------------------------
# Resizing and cropping (ImageNet)


def _to_pil(image: Array):  # noqa: ANN202 (PIL is imported lazily)
    from PIL import Image

    image = np.ascontiguousarray(image, dtype=np.uint8)
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _from_pil(pil, channels: int) -> Array:  # noqa: ANN001
    out = np.asarray(pil, dtype=np.uint8)
    return out[..., None] if channels == 1 else out


def resize(image: Array, height: int, width: int) -> Array:
    """Bilinear resize (Pillow's filter, antialiased when shrinking) to (height, width)."""
    from PIL import Image

    if image.shape[:2] == (height, width):
        return image
    pil = _to_pil(image).resize((width, height), Image.Resampling.BILINEAR)
    return _from_pil(pil, image.shape[-1])


def resize_shorter(image: Array, size: int) -> Array:
    """torchvision Resize(size): the shorter side becomes `size`, the aspect ratio is kept (the
    longer side truncated, as torchvision does)."""
    h, w = image.shape[:2]
    if h <= w:
        return resize(image, size, int(size * w / h))
    return resize(image, int(size * h / w), size)


def center_crop(image: Array, size: int) -> Array:
    """torchvision CenterCrop(size): zero-padded first when the image is smaller."""
    h, w = image.shape[:2]
    if h < size or w < size:
        ph, pw = max(size - h, 0), max(size - w, 0)
        image = np.pad(image, ((ph // 2, (ph + 1) // 2), (pw // 2, (pw + 1) // 2), (0, 0)))
        h, w = image.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image[top : top + size, left : left + size]


def random_resized_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width) as torchvision's RandomResizedCrop.get_params: ten
    tries at a random area fraction and log-uniform aspect ratio, else the largest centred crop
    whose ratio is clamped into `ratio`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image: Array, size: int, rng: np.random.Generator) -> Array:
    """A random crop (`random_resized_crop_box`) resized to size x size."""
    top, left, h, w = random_resized_crop_box(image.shape[0], image.shape[1], rng)
    return resize(image[top : top + h, left : left + w], size, size)


def random_flip(image: Array, rng: np.random.Generator, p: float = 0.5) -> Array:
    """Horizontal (left-right) flip with probability p."""
    return image[:, ::-1] if rng.random() < p else image


def random_shift(image: Array, rng: np.random.Generator, pixels: int = 1) -> Array:
    """Zero-pad by `pixels` and crop back at a random offset: a translation of up to `pixels`
    in each direction (our augmentation for the 8x8 digits)."""
    h, w = image.shape[:2]
    padded = np.pad(image, ((pixels, pixels), (pixels, pixels), (0, 0)))
    top, left = rng.integers(0, 2 * pixels + 1, size=2)
    return padded[top : top + h, left : left + w]


def normalise(image: Array, mean: Sequence[float], std: Sequence[float]) -> Array:
    """uint8 -> float32: /255, then per-channel (x - mean) / std."""
    x = np.asarray(image, np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


# ------------------------------------------------------------------------------------------------
# AutoAugment operations (uint8 (H, W, C) -> uint8 (H, W, C))


def _sample_affine(image: Array, inverse: np.ndarray) -> Array:
    """Nearest-neighbour affine warp: output pixel (x, y) takes the input pixel under
    `inverse` @ (x + 0.5, y + 0.5, 1) (a 2x3 map from output to input coordinates, Pillow's
    convention); outside the image is black."""
    h, w = image.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    src_x = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    src_y = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    ix, iy = np.floor(src_x).astype(np.int64), np.floor(src_y).astype(np.int64)
    inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    out = np.zeros_like(image)
    out[inside] = image[iy[inside], ix[inside]]
    return out


def shear_x(image: Array, m: float) -> Array:
    """Horizontal shear about the top-left corner: output (x, y) <- input (x + m y, y)."""
    return _sample_affine(image, np.array([[1.0, m, 0.0], [0.0, 1.0, 0.0]]))


def shear_y(image: Array, m: float) -> Array:
    """Vertical shear about the top-left corner: output (x, y) <- input (x, y + m x)."""
    return _sample_affine(image, np.array([[1.0, 0.0, 0.0], [m, 1.0, 0.0]]))


def translate_x(image: Array, pixels: float) -> Array:
    """Shift right by int(pixels) (left when negative), black fill."""
    return _sample_affine(image, np.array([[1.0, 0.0, -int(pixels)], [0.0, 1.0, 0.0]]))


def translate_y(image: Array, pixels: float) -> Array:
    """Shift down by int(pixels) (up when negative), black fill."""
    return _sample_affine(image, np.array([[1.0, 0.0, 0.0], [0.0, 1.0, -int(pixels)]]))


def rotate(image: Array, degrees: float) -> Array:
    """Counter-clockwise rotation about the image centre, same size, black fill."""
    h, w = image.shape[:2]
    a = math.radians(degrees)
    cos, sin = math.cos(a), math.sin(a)
    cx, cy = w / 2.0, h / 2.0
    # input = R^-1 (output - centre) + centre, with y pointing down (so CCW on screen).
    inverse = np.array(
        [
            [cos, -sin, cx - cos * cx + sin * cy],
            [sin, cos, cy - sin * cx - cos * cy],
        ]
    )
    return _sample_affine(image, inverse)


def _blend(degenerate: Array, image: Array, factor: float) -> Array:
    """Pillow's Image.blend(degenerate, image, factor): truncated towards zero, clipped."""
    out = degenerate.astype(np.float32) + np.float32(factor) * (
        image.astype(np.float32) - degenerate.astype(np.float32)
    )
    return np.clip(np.trunc(out), 0, 255).astype(np.uint8)


def grayscale(image: Array) -> Array:
    """Pillow's RGB -> L (ITU-R 601-2 luma, fixed point, rounded): (H, W) uint8."""
    if image.shape[-1] == 1:
        return image[..., 0]
    rgb = image.astype(np.uint32)
    luma = rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000
    return (luma >> 16).astype(np.uint8)


def brightness(image: Array, factor: float) -> Array:
    """Blend with black (factor 1: unchanged)."""
    return _blend(np.zeros_like(image), image, factor)


def color(image: Array, factor: float) -> Array:
    """Saturation: blend with the greyscale image."""
    grey = np.broadcast_to(grayscale(image)[..., None], image.shape)
    return _blend(grey, image, factor)


def contrast(image: Array, factor: float) -> Array:
    """Blend with a flat image at the mean grey level (rounded, as Pillow)."""
    mean = int(grayscale(image).mean() + 0.5)
    return _blend(np.full_like(image, mean), image, factor)


def sharpness(image: Array, factor: float) -> Array:
    """Blend with Pillow's SMOOTH filter (3x3 kernel 1,1,1/1,5,1/1,1,1 over 13; the one-pixel
    border is left unsmoothed)."""
    h, w = image.shape[:2]
    smooth = image.copy()
    if h > 2 and w > 2:
        x = image.astype(np.float32)
        total = sum(x[dy : dy + h - 2, dx : dx + w - 2] for dy in range(3) for dx in range(3))
        inner = (total + 4 * x[1:-1, 1:-1]) / 13.0  # the centre weighs 5 = 1 + 4
        smooth[1:-1, 1:-1] = np.clip(np.floor(inner + 0.5), 0, 255).astype(np.uint8)
    return _blend(smooth, image, factor)


def posterize(image: Array, bits: int) -> Array:
    """Keep the `bits` most significant bits of every channel."""
    return image & np.uint8((0xFF << (8 - int(bits))) & 0xFF)


def solarize(image: Array, threshold: float) -> Array:
    """Invert every value >= threshold."""
    return np.where(image >= threshold, 255 - image, image).astype(np.uint8)


def _per_channel_lut(image: Array, make_lut: Callable[[np.ndarray], np.ndarray]) -> Array:
    out = np.empty_like(image)
    for c in range(image.shape[-1]):
        histogram = np.bincount(image[..., c].ravel(), minlength=256)
        out[..., c] = make_lut(histogram).astype(np.uint8)[image[..., c]]
    return out


def _autocontrast_lut(histogram: np.ndarray) -> np.ndarray:
    present = np.nonzero(histogram)[0]
    lo, hi = int(present[0]), int(present[-1])
    if hi <= lo:
        return np.arange(256)
    scale = 255.0 / (hi - lo)
    return np.clip((np.arange(256) * scale - lo * scale).astype(np.int64), 0, 255)


def autocontrast(image: Array) -> Array:
    """Stretch each channel so its darkest value maps to 0 and its brightest to 255."""
    return _per_channel_lut(image, _autocontrast_lut)


def _equalize_lut(histogram: np.ndarray) -> np.ndarray:
    used = histogram[histogram > 0]
    if len(used) <= 1:
        return np.arange(256)
    step = (int(used.sum()) - int(used[-1])) // 255
    if step == 0:
        return np.arange(256)
    # Pillow: lut[i] = (step // 2 + number of pixels below i) // step
    below = np.concatenate([[0], np.cumsum(histogram)[:-1]])
    return np.minimum((step // 2 + below) // step, 255)


def equalize(image: Array) -> Array:
    """Histogram equalisation per channel (Pillow's ImageOps.equalize)."""
    return _per_channel_lut(image, _equalize_lut)


def invert(image: Array) -> Array:
    return (255 - image).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# The CIFAR-10 policy

NUM_MAGNITUDE_BINS = 10

# (operation, probability, magnitude bin or None): the 25 sub-policies found on CIFAR-10.
CIFAR10_POLICY: tuple[tuple[tuple[str, float, int | None], tuple[str, float, int | None]], ...] = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
    (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
    (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)


def magnitude(op: str, bin_index: int, height: int, width: int) -> tuple[float, bool]:
    """(magnitude of `op` at `bin_index` of 10, whether it takes a random sign).

    Shears 0-0.3, translations 0-150/331 of the image side, rotation 0-30 degrees, the
    enhancements 0-0.9 (used as factor 1 +- m), posterize 8-4 bits, solarize threshold 255-0.
    """
    t = bin_index / (NUM_MAGNITUDE_BINS - 1)
    if op in ("ShearX", "ShearY"):
        return 0.3 * t, True
    if op == "TranslateX":
        return 150.0 / 331.0 * width * t, True
    if op == "TranslateY":
        return 150.0 / 331.0 * height * t, True
    if op == "Rotate":
        return 30.0 * t, True
    if op in ("Brightness", "Color", "Contrast", "Sharpness"):
        return 0.9 * t, True
    if op == "Posterize":
        return float(8 - int(round(bin_index / ((NUM_MAGNITUDE_BINS - 1) / 4)))), False
    if op == "Solarize":
        return 255.0 * (1.0 - t), False
    raise ValueError(f"{op} takes no magnitude")


def apply_op(image: Array, op: str, m: float) -> Array:
    """One AutoAugment operation at signed magnitude m."""
    if op == "ShearX":
        return shear_x(image, m)
    if op == "ShearY":
        return shear_y(image, m)
    if op == "TranslateX":
        return translate_x(image, m)
    if op == "TranslateY":
        return translate_y(image, m)
    if op == "Rotate":
        return rotate(image, m)
    if op == "Brightness":
        return brightness(image, 1.0 + m)
    if op == "Color":
        return color(image, 1.0 + m)
    if op == "Contrast":
        return contrast(image, 1.0 + m)
    if op == "Sharpness":
        return sharpness(image, 1.0 + m)
    if op == "Posterize":
        return posterize(image, int(m))
    if op == "Solarize":
        return solarize(image, m)
    if op == "AutoContrast":
        return autocontrast(image)
    if op == "Equalize":
        return equalize(image)
    if op == "Invert":
        return invert(image)
    raise ValueError(f"unknown AutoAugment operation {op!r}")


def autoaugment_cifar10(image: Array, rng: np.random.Generator) -> Array:
    """One uniformly drawn sub-policy; each of its two operations is applied with its
    probability, signed magnitudes get a random sign (torchvision's order of draws: policy,
    then both probabilities, then both signs)."""
    policy = CIFAR10_POLICY[int(rng.integers(len(CIFAR10_POLICY)))]
    probs = rng.random(2)
    signs = rng.integers(0, 2, size=2)
    h, w = image.shape[:2]
    for i, (op, p, bin_index) in enumerate(policy):
        if probs[i] <= p:
            m, signed = (0.0, False) if bin_index is None else magnitude(op, bin_index, h, w)
            if signed and signs[i] == 0:
                m = -m
            image = apply_op(image, op, m)
    return image
