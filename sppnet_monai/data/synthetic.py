"""A deterministic synthetic H&E-like nuclei dataset: the bundle's embedded default.

Images are made with the Beer-Lambert stain model of H&E: each pixel has a haematoxylin and an
eosin concentration, its optical density is ``c_H * h + c_E * e`` for stain vectors ``h, e``,
and its colour is ``255 * exp(-OD)``. Nuclei are haematoxylin-rich blobs (ellipses with a few
Fourier harmonics on the outline, varied size and orientation, chromatin texture and a darker
rim); stroma is eosin with fibres, texture and pale gaps. Each image perturbs the stain vectors
and strengths, then is blurred and noised. About a fifth of the nuclei are pale, so no single
threshold separates nuclei from stroma exactly.

Some nuclei are placed touching a neighbour and some overlapping one; where nuclei overlap the
one drawn later owns the pixels (the MoNuSeg convention) and looks darker (stacked stain).
Everything derives from ``np.random.default_rng([seed, index])``: the same ``seed`` gives the
same bytes (with the same numpy/scipy), and image ``i`` does not depend on how many are made.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from sppnet_monai.data.instances import relabel_consecutive

__all__ = ["SyntheticSample", "synthesize_sample", "touching_pairs"]

# Optical-density stain vectors (R, G, B): the reference H&E matrix of Macenko et al. (2009).
HAEMATOXYLIN = np.array([0.5626, 0.7201, 0.4062])
EOSIN = np.array([0.2159, 0.8012, 0.5581])

_TOUCH_PROBABILITY = 0.15
_OVERLAP_PROBABILITY = 0.12
_PALE_PROBABILITY = 0.2
_MIN_PIXELS = 12  # a nucleus left smaller than this by later ones is dropped


@dataclass(frozen=True)
class SyntheticSample:
    image: np.ndarray  # (S, S, 3) uint8 RGB
    labels: np.ndarray  # (S, S) uint16 instance map, 0 = background
    overlapping: int  # pairs of visible nuclei where the later one covers part of the earlier


@dataclass(frozen=True)
class _Nucleus:
    centre: np.ndarray  # (2,) float (row, col)
    semi_axes: tuple[float, float]  # (a, b), a >= b, pixels
    angle: float  # orientation of the long axis, radians
    harmonics: np.ndarray  # (K, 2) amplitude, phase of outline harmonics k = 2..K + 1
    stain: float  # haematoxylin concentration

    @property
    def radius(self) -> float:
        return float(np.sqrt(self.semi_axes[0] * self.semi_axes[1]))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float | tuple[float, float]) -> np.ndarray:
    """``shape`` float64 white noise blurred by a (periodic) Gaussian of ``sigma`` pixels, zero mean, unit std.

    Filtered in the Fourier domain: the cost does not grow with ``sigma`` (up to a quarter of
    the image for the slow stain variations).
    """
    sigma_rows, sigma_cols = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (2,))
    freq_rows, freq_cols = np.fft.fftfreq(shape[0])[:, None], np.fft.rfftfreq(shape[1])[None, :]
    transfer = np.exp(-2.0 * np.pi**2 * ((freq_rows * sigma_rows) ** 2 + (freq_cols * sigma_cols) ** 2))
    field = np.fft.irfft2(np.fft.rfft2(rng.standard_normal(shape)) * transfer, s=shape)
    return (field - field.mean()) / (field.std() + 1e-12)


def _perturbed_stain(rng: np.random.Generator, vector: np.ndarray) -> np.ndarray:
    """A unit stain vector near ``vector``: per-image stain variation."""
    perturbed = np.clip(vector + rng.normal(0.0, 0.05, 3), 0.02, None)
    return perturbed / np.linalg.norm(perturbed)


def _random_nucleus(rng: np.random.Generator, centre: np.ndarray, scale: float) -> _Nucleus:
    a = max(rng.uniform(4.0, 11.0) * scale, 3.0)
    b = max(a * rng.uniform(0.5, 1.0), 2.0)
    harmonics = np.stack([rng.uniform(0.0, 0.1, 3), rng.uniform(0.0, 2 * np.pi, 3)], axis=1)
    pale = rng.random() < _PALE_PROBABILITY
    stain = rng.uniform(0.3, 0.5) if pale else rng.uniform(0.7, 1.3)
    return _Nucleus(centre, (a, b), rng.uniform(0.0, np.pi), harmonics, stain)


def _nucleus_footprint(nucleus: _Nucleus, shape: tuple[int, int]) -> tuple[tuple[slice, slice], np.ndarray]:
    """Bounding box (clipped to ``shape``) and ``rho`` in it: ``rho < 1`` inside, 1 on the outline."""
    reach = int(np.ceil(nucleus.semi_axes[0] * 1.4)) + 1
    row0, col0 = (max(int(c) - reach, 0) for c in nucleus.centre)
    row1, col1 = (min(int(c) + reach + 1, n) for c, n in zip(nucleus.centre, shape))
    rows, cols = np.mgrid[row0:row1, col0:col1].astype(np.float64)
    dy, dx = rows - nucleus.centre[0], cols - nucleus.centre[1]
    u = dx * np.cos(nucleus.angle) + dy * np.sin(nucleus.angle)
    v = -dx * np.sin(nucleus.angle) + dy * np.cos(nucleus.angle)
    a, b = nucleus.semi_axes
    theta = np.arctan2(v / b, u / a)
    outline = 1.0 + sum(amp * np.cos(k * theta + phase) for k, (amp, phase) in enumerate(nucleus.harmonics, start=2))
    return (slice(row0, row1), slice(col0, col1)), np.hypot(u / a, v / b) / outline


def _place_nuclei(rng: np.random.Generator, size: int) -> list[_Nucleus]:
    """Nuclei with centres in the image: free ones apart, others touching or overlapping one."""
    # Nuclei sizes of 40x up to 256 px; smaller (at most halved) in smaller images, so that
    # tiny smoke-test images still hold several whole nuclei. Count keeps the nuclear density.
    scale = min(max(size / 256.0, 0.5), 1.0)
    count = int(rng.integers(30, 50) * (size / (256.0 * scale)) ** 2) + 2
    nuclei: list[_Nucleus] = []
    centres, radii = np.empty((count, 2)), np.empty(count)  # of nuclei[:len(nuclei)], for distances
    for _ in range(count):
        for _attempt in range(30):
            mode = rng.random()
            nucleus = _random_nucleus(rng, rng.uniform(0, size, 2), scale)
            placed = len(nuclei)
            if placed and mode < _TOUCH_PROBABILITY + _OVERLAP_PROBABILITY:
                # next to a random earlier nucleus: at the sum of radii (touching) or closer
                other = nuclei[int(rng.integers(placed))]
                factor = rng.uniform(0.95, 1.05) if mode < _TOUCH_PROBABILITY else rng.uniform(0.5, 0.8)
                direction = rng.uniform(0.0, 2 * np.pi)
                offset = factor * (other.radius + nucleus.radius) * np.array([np.sin(direction), np.cos(direction)])
                nucleus = dataclasses.replace(nucleus, centre=other.centre + offset)
                if not ((0 <= nucleus.centre) & (nucleus.centre < size)).all():
                    continue
            else:  # a free nucleus keeps clear of all others
                distances = np.linalg.norm(centres[:placed] - nucleus.centre, axis=1)
                if (distances <= 1.15 * (radii[:placed] + nucleus.radius)).any():
                    continue
            centres[placed], radii[placed] = nucleus.centre, nucleus.radius
            nuclei.append(nucleus)
            break
    return nuclei


def touching_pairs(labels: np.ndarray) -> set[tuple[int, int]]:
    """Pairs ``(i, j)``, ``0 < i < j``, of instances in ``(H, W)`` ``labels`` that are 4-adjacent."""
    pairs: set[tuple[int, int]] = set()
    for a, b in ((labels[1:, :], labels[:-1, :]), (labels[:, 1:], labels[:, :-1])):
        contact = (a != b) & (a > 0) & (b > 0)
        low, high = np.minimum(a[contact], b[contact]), np.maximum(a[contact], b[contact])
        pairs.update(zip(low.tolist(), high.tolist()))
    return pairs


def synthesize_sample(rng: np.random.Generator, size: int) -> SyntheticSample:
    """One ``size x size`` H&E-like image with its instance labels (see the module docstring)."""
    shape = (size, size)
    stain_h, stain_e = _perturbed_stain(rng, HAEMATOXYLIN), _perturbed_stain(rng, EOSIN)
    strength_h, strength_e = rng.uniform(0.8, 1.2), rng.uniform(0.6, 1.1)

    # Stroma: eosin with large-scale texture, fibres along a random direction and pale gaps.
    fibres = ndimage.rotate(_smooth_noise(rng, shape, (0.8, 6.0)), rng.uniform(0, 180), reshape=False, mode="wrap")
    eosin = 0.5 * strength_e * (1.0 + 0.25 * _smooth_noise(rng, shape, size / 16) + 0.12 * fibres)
    gaps = _smooth_noise(rng, shape, size / 24) > 1.6
    eosin = np.where(gaps, 0.25 * eosin, eosin).clip(0.02, None)
    haematoxylin = np.clip(0.08 + 0.03 * _smooth_noise(rng, shape, 2.0), 0.0, None)

    # Nuclei: haematoxylin blobs with chromatin texture and a darker rim.
    chromatin = _smooth_noise(rng, shape, 1.0)
    labels = np.zeros(shape, dtype=np.int32)
    nucleus_stain = np.zeros(shape)
    nuclei = _place_nuclei(rng, size)
    covered: set[tuple[int, int]] = set()  # (earlier, later) where later is drawn over earlier
    for index, nucleus in enumerate(nuclei, start=1):
        box, rho = _nucleus_footprint(nucleus, shape)
        inside = rho < 1.0
        covered.update((int(earlier), index) for earlier in np.unique(labels[box][inside]) if earlier > 0)
        stain = nucleus.stain * strength_h * (0.85 + 0.3 * rho**3) * (1.0 + 0.2 * chromatin[box])
        stacked = np.where(labels[box] > 0, 0.3 * nucleus_stain[box], 0.0)  # overlaps look darker
        nucleus_stain[box] = np.where(inside, stain + stacked, nucleus_stain[box])
        labels[box] = np.where(inside, index, labels[box])
    sizes = np.bincount(labels.ravel(), minlength=len(nuclei) + 1)
    labels[sizes[labels] < _MIN_PIXELS] = 0
    visible = set(np.flatnonzero(sizes >= _MIN_PIXELS).tolist()) - {0}
    is_nucleus = labels > 0
    haematoxylin = np.where(is_nucleus, nucleus_stain, haematoxylin)
    eosin = np.where(is_nucleus, 0.35 * eosin, eosin)
    overlapping = sum(1 for earlier, later in covered if earlier in visible and later in visible)

    # Beer-Lambert composition, illumination gradient, optical blur and sensor noise.
    density = haematoxylin[..., None] * stain_h + eosin[..., None] * stain_e
    illumination = 1.0 + 0.04 * _smooth_noise(rng, shape, size / 4)
    rgb = 255.0 * np.exp(-density) * illumination[..., None]
    rgb = ndimage.gaussian_filter(rgb, (rng.uniform(0.6, 1.2),) * 2 + (0,))
    rgb += rng.normal(0.0, rng.uniform(2.0, 5.0), rgb.shape)
    image = np.clip(np.round(rgb), 0, 255).astype(np.uint8)
    return SyntheticSample(image=image, labels=relabel_consecutive(labels), overlapping=overlapping)


def nuclei_slide_tile(origin: tuple[int, int], shape: tuple[int, int], centres: np.ndarray, radius: float) -> np.ndarray:
    """``(h, w, 3)`` uint8 of a plain H&E-like slide at ``origin`` (x, y): eosin background and haematoxylin
    disks of ``radius`` at ``centres`` ``(N, 2)`` (x, y, slide pixels). Any window of a slide can be drawn
    on its own, so a large slide is written tile by tile."""
    x0, y0 = origin
    h, w = shape
    stain = np.zeros(shape)
    near = centres[(np.abs(centres[:, 0] - (x0 + w / 2)) < w / 2 + radius) & (np.abs(centres[:, 1] - (y0 + h / 2)) < h / 2 + radius)]
    reach = int(np.ceil(radius))
    for cx, cy in near:  # each disk drawn in its own bounding box, not over the whole tile
        top, left = max(0, int(cy) - reach - y0), max(0, int(cx) - reach - x0)
        bottom, right = min(h, int(cy) + reach + 2 - y0), min(w, int(cx) + reach + 2 - x0)
        if top >= bottom or left >= right:
            continue
        rows, cols = np.mgrid[y0 + top : y0 + bottom, x0 + left : x0 + right]
        box = stain[top:bottom, left:right]
        np.maximum(box, (cols - cx) ** 2 + (rows - cy) ** 2 < radius**2, out=box)
    density = 0.25 * EOSIN[None, None] + stain[..., None] * (1.1 * HAEMATOXYLIN[None, None])
    return (255 * np.exp(-density)).round().clip(0, 255).astype(np.uint8)


def write_nuclei_slide(
    path, width: int, height: int, centres: np.ndarray, radius: float = 8.0, levels: int = 3, tile: int = 256,
    mpp: float = 0.25, compression: str = "zlib",
) -> None:
    """A pyramidal tiled TIFF (:func:`write_pyramidal_tiff`) of :func:`nuclei_slide_tile`, written tile by tile."""
    write_pyramidal_tiff(
        path, width, height, lambda origin, size: nuclei_slide_tile(origin, size, centres, radius), levels, tile, mpp, compression
    )


def write_pyramidal_tiff(
    path, width: int, height: int, read_region, levels: int = 3, tile: int = 256, mpp: float = 0.25, compression: str = "zlib"
) -> None:
    """A pyramidal tiled TIFF as OpenSlide reads generic tiled TIFFs: level ``k`` downsampled ``2**k``, ``tile``
    square tiles, ``compression``, pixel size ``mpp`` microns. ``read_region((x, y), (w, h))`` gives the
    ``(h, w, 3)`` uint8 RGB of level 0 there (it may be asked beyond the border: padding)."""
    import tifffile

    def tiles(level: int):
        step = 2**level
        lw, lh = -(-width // step), -(-height // step)
        for ty in range(0, lh, tile):
            for tx in range(0, lw, tile):
                full = read_region((tx * step, ty * step), (tile * step, tile * step))
                yield np.ascontiguousarray(full[::step, ::step])

    resolution = (1e4 / (mpp), 1e4 / (mpp))  # pixels per centimetre
    with tifffile.TiffWriter(path, bigtiff=width * height > 2**31) as tif:
        for level in range(levels):
            step = 2**level
            tif.write(
                tiles(level), shape=(-(-height // step), -(-width // step), 3), dtype=np.uint8, tile=(tile, tile),
                photometric="rgb", compression=compression, subfiletype=0 if level == 0 else 1,
                resolution=(resolution[0] / step, resolution[1] / step), resolutionunit="CENTIMETER",
            )
