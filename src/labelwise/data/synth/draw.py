"""Vectorised drawing primitives for the synthetic testbeds.

Everything works on whole coordinate grids (no Python loops over pixels): a shape is a
boolean mask computed from an object's *local* coordinates ``(u, v)`` (pixel coordinates
translated to the object centre, rotated and divided by the object radius), a texture
is a float map in ``[0, 1]`` computed from the same coordinates (so it moves, turns and
scales with the object) and coloured by blending two RGB colours.
"""

from __future__ import annotations

import functools
import zlib

import numpy as np

# --------------------------------------------------------------------------- rng + grids


def image_rng(seed: int, kind: str, split: str, index: int) -> np.random.Generator:
    """The generator of one image: seeded from ``(seed, kind, split, index)`` only.

    Each image has its own stream, so an image does not depend on how many images come
    before it, and the global numpy RNG is never touched.
    """
    entropy = [int(seed), zlib.crc32(kind.encode()), zlib.crc32(split.encode()), int(index)]
    return np.random.default_rng(np.random.SeedSequence(entropy))


@functools.lru_cache(maxsize=8)
def pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(X, Y)`` pixel-centre coordinates, ``size x size`` float32 (read-only, cached)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    xs.setflags(write=False)
    ys.setflags(write=False)
    return xs, ys


def local_coords(size: int, cx: float, cy: float, radius: float, angle: float = 0.0,
                 flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Object-local coordinates: centre at 0, unit = ``radius`` pixels, rotated by ``angle``."""
    xs, ys = pixel_grid(size)
    dx = (xs - np.float32(cx)) / np.float32(radius)
    dy = (ys - np.float32(cy)) / np.float32(radius)
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    u = c * dx + s * dy
    v = -s * dx + c * dy
    if flip:
        u = -u
    return u, v


# --------------------------------------------------------------------------- shapes
# Each shape fits roughly in the unit disc of the local coordinates.


def _polar(u, v):
    return np.hypot(u, v), np.arctan2(v, u)


def shape_disc(u, v):
    return u * u + v * v <= 0.85


def shape_ellipse(u, v, a=1.0, b=0.6):
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def shape_ring(u, v):
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= 0.36)


def shape_square(u, v):
    return np.maximum(np.abs(u), np.abs(v)) <= 0.75


def shape_rect(u, v, a=1.0, b=0.5):
    return (np.abs(u) <= a) & (np.abs(v) <= b)


def shape_triangle(u, v):
    # equilateral triangle with circumradius 1 pointing up (-v is up in image coords)
    return (v <= 0.5) & (np.sqrt(3.0) * u - v <= 1.0) & (-np.sqrt(3.0) * u - v <= 1.0)


def shape_star(u, v):
    r, phi = _polar(u, v)
    return r <= 0.55 + 0.45 * np.cos(5.0 * phi) ** 2 * (np.cos(5.0 * phi) > 0)


def shape_cross(u, v):
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))


def shape_diamond(u, v):
    return np.abs(u) / 0.65 + np.abs(v) <= 1.0


def shape_hexagon(u, v):
    au, av = np.abs(u), np.abs(v)
    return (av <= 0.82) & (0.5 * av + 0.866 * au <= 0.82)


def shape_crescent(u, v):
    return (u * u + v * v <= 1.0) & ((u - 0.5) ** 2 + v * v >= 0.7 ** 2)


def shape_arrow(u, v):
    head = (u >= 0.1) & (np.abs(v) <= (1.0 - u) * 0.8)
    shaft = (u >= -1.0) & (u < 0.1) & (np.abs(v) <= 0.25)
    return head | shaft


def shape_trapezoid(u, v):
    return (np.abs(v) <= 0.5) & (np.abs(u) <= 0.75 + 0.35 * v)


SHAPES = {
    "disc": shape_disc, "ellipse": shape_ellipse, "ring": shape_ring, "square": shape_square,
    "rect": shape_rect, "triangle": shape_triangle, "star": shape_star, "cross": shape_cross,
    "diamond": shape_diamond, "hexagon": shape_hexagon, "crescent": shape_crescent,
    "arrow": shape_arrow, "trapezoid": shape_trapezoid,
}


# --------------------------------------------------------------------------- textures


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise in ``[0, 1]``: a random ``(cells+1)^2`` grid bilinearly upsampled."""
    g = rng.random((cells + 1, cells + 1), dtype=np.float32)
    t = (np.arange(size, dtype=np.float32) + 0.5) * (cells / size)
    i0 = np.minimum(t.astype(np.int64), cells - 1)
    f = t - i0
    f = f * f * (3 - 2 * f)  # smoothstep: no visible grid creases
    rows = g[i0] * (1 - f)[:, None] + g[i0 + 1] * f[:, None]            # size x (cells+1)
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


def _wave(x, freq, phase):
    return 0.5 + 0.5 * np.sin(np.float32(2 * np.pi * freq) * x + np.float32(phase))


def texture(kind: str, u, v, freq: float, angle: float = 0.0, phase: float = 0.0) -> np.ndarray:
    """A pattern in ``[0, 1]`` over local coordinates (``freq`` in cycles per unit)."""
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    a = c * u + s * v
    b = -s * u + c * v
    if kind == "stripes":
        return _wave(a, freq, phase)
    if kind == "zigzag":
        return _wave(a + 0.25 / freq * np.abs(np.sin(np.float32(2 * np.pi * freq) * b)), freq, phase)
    if kind == "checker":
        return 0.5 + 0.5 * np.tanh(4.0 * np.sin(np.float32(np.pi * freq) * a + phase)
                                   * np.sin(np.float32(np.pi * freq) * b + phase))
    if kind == "dots":
        d = np.sin(np.float32(2 * np.pi * freq) * a + phase) * np.sin(np.float32(2 * np.pi * freq) * b + phase)
        return (d > 0.35).astype(np.float32)
    if kind == "rings":
        return _wave(np.hypot(u, v), freq, phase)
    if kind == "radial":
        return _wave(np.arctan2(v, u) / np.float32(2 * np.pi), freq, phase)
    if kind == "grid":
        return np.maximum(_wave(a, freq, phase), _wave(b, freq, phase)) ** 4
    if kind == "plain":
        return np.clip(0.5 + 0.35 * a, 0.0, 1.0)
    raise ValueError(f"unknown texture {kind!r}")


def colourise(pattern: np.ndarray, c0, c1) -> np.ndarray:
    """Blend two RGB colours (0..255) by ``pattern`` -> ``H x W x 3`` float32."""
    c0 = np.asarray(c0, dtype=np.float32)
    c1 = np.asarray(c1, dtype=np.float32)
    return c0 + (c1 - c0) * pattern[..., None]


def jitter_colour(rng: np.random.Generator, colour, amount: float = 12.0) -> np.ndarray:
    return np.clip(np.asarray(colour, dtype=np.float32) + rng.normal(0.0, amount, 3), 0, 255)


def paint(canvas: np.ndarray, mask: np.ndarray, rgb: np.ndarray) -> None:
    """Write ``rgb`` (``H x W x 3`` or one colour) into ``canvas`` where ``mask`` is set."""
    if rgb.ndim == 3:
        canvas[mask] = rgb[mask]
    else:
        canvas[mask] = rgb


def finish(canvas: np.ndarray, rng: np.random.Generator, noise: float = 4.0) -> np.ndarray:
    """Add sensor noise and convert to ``uint8``."""
    out = canvas + rng.normal(0.0, noise, canvas.shape).astype(np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def touching(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two disjoint masks share a 4-neighbour boundary."""
    return bool((a[1:] & b[:-1]).any() or (a[:-1] & b[1:]).any()
                or (a[:, 1:] & b[:, :-1]).any() or (a[:, :-1] & b[:, 1:]).any())
