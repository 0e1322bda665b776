"""Synthetic abdominal CT phantoms with BTCV-style organ labels.

A phantom is built in world RAS millimetres (x towards the patient's right, y anterior, z
superior, origin near the renal hilum on the midline) from a reference anatomy that is scaled
per patient, then sampled on a voxel grid whose size, spacing and field of view vary per
volume, and finally stored in one of several orientations (RAS, LPS, flipped axes) with an
affine that keeps the anatomy in place: after reorientation to RAS (for example
``nibabel.as_closest_canonical``) the liver is always on the patient's right (+x).

Everything is vectorised numpy; each organ is evaluated on its bounding box only.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

BTCV_LABELS: Mapping[int, str] = MappingProxyType({
    0: "background",
    1: "spleen",
    2: "right kidney",
    3: "left kidney",
    4: "gallbladder",
    5: "esophagus",
    6: "liver",
    7: "stomach",
    8: "aorta",
    9: "inferior vena cava",
    10: "portal and splenic vein",
    11: "pancreas",
    12: "right adrenal gland",
    13: "left adrenal gland",
})

# Typical portal-venous-phase attenuation of each organ (HU, before noise and smoothing).
ORGAN_HU: Mapping[int, float] = MappingProxyType({
    1: 50.0,  # spleen
    2: 150.0,  # right kidney (contrast)
    3: 150.0,  # left kidney
    4: 10.0,  # gallbladder (bile)
    5: 40.0,  # esophagus
    6: 60.0,  # liver
    7: 25.0,  # stomach contents / wall (plus a gas pocket at about -900)
    8: 180.0,  # aorta
    9: 170.0,  # inferior vena cava
    10: 165.0,  # portal and splenic vein
    11: 45.0,  # pancreas
    12: 30.0,  # right adrenal
    13: 30.0,  # left adrenal
})

ORIENTATIONS: tuple[str, ...] = ("RAS", "LPS", "LAS", "RPI", "LPI", "RAS")

# Reference-anatomy positions below are in mm with +x = patient's right (RAS).
_BODY_AX, _BODY_AY = 165.0, 115.0
_MUSCLE_WALL = 12.0
_SPINE_C = (0.0, -55.0)


@dataclass
class Phantom:
    """One synthetic CT volume in RAS voxel order.

    ``image``: int16 (X, Y, Z) Hounsfield units; ``label``: uint8 (X, Y, Z) BTCV ids;
    ``affine``: (4, 4) voxel -> world RAS mm for these RAS-ordered arrays (diagonal spacing
    plus origin); ``orientation``: the axis codes the volume is to be stored in.
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    orientation: str
    info: dict = field(default_factory=dict)


class _Grid:
    """World / reference coordinates of the voxel grid (RAS order, positive spacing)."""

    def __init__(self, shape: tuple[int, int, int], spacing: np.ndarray, origin: np.ndarray, scale: np.ndarray):
        self.shape = shape
        self.spacing = spacing
        self.origin = origin  # world mm of voxel (0, 0, 0), anatomy frame
        self.scale = scale  # world = reference * scale

    def ref_axis(self, axis: int, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Reference-mm coordinates of voxel centres along one axis, float32 (n,)."""
        hi = self.shape[axis] if hi is None else hi
        idx = np.arange(lo, hi, dtype=np.float32)
        return (self.origin[axis] + idx * self.spacing[axis]) / self.scale[axis]

    def ref_mesh(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable reference coordinates (nx,1,1), (1,ny,1), (1,1,nz) inside ``box``."""
        x = self.ref_axis(0, box[0].start, box[0].stop)[:, None, None]
        y = self.ref_axis(1, box[1].start, box[1].stop)[None, :, None]
        z = self.ref_axis(2, box[2].start, box[2].stop)[None, None, :]
        return x, y, z

    def box(self, lo_ref: Sequence[float], hi_ref: Sequence[float]) -> tuple[slice, slice, slice] | None:
        """Voxel slices covering the reference-mm box [lo, hi]; None when it misses the grid."""
        out = []
        for a in range(3):
            lo = (lo_ref[a] * self.scale[a] - self.origin[a]) / self.spacing[a]
            hi = (hi_ref[a] * self.scale[a] - self.origin[a]) / self.spacing[a]
            i0 = max(int(np.floor(min(lo, hi))), 0)
            i1 = min(int(np.ceil(max(lo, hi))) + 1, self.shape[a])
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return tuple(out)  # type: ignore[return-value]


_NOISE_MODES = 6
_NOISE_BOUND = 0.5 * np.sqrt(2.0 * _NOISE_MODES)  # exact bound of |_noise_field|


def _noise_field(rng: np.random.Generator, coords: Sequence[np.ndarray], extent: float) -> np.ndarray:
    """Smooth random field (std 0.5, |value| <= ``_NOISE_BOUND``) at points ``coords`` (broadcastable arrays).

    A sum of random plane waves with wavelengths of about 1-2 ``extent``.
    """
    out = None
    for _ in range(_NOISE_MODES):
        w = rng.standard_normal(3)
        w = (w * rng.uniform(1.5, 3.5) / (np.linalg.norm(w) * extent)).astype(np.float32)
        wave = np.cos(w[0] * coords[0] + w[1] * coords[1] + w[2] * coords[2] + np.float32(rng.uniform(0, 2 * np.pi)))
        out = wave if out is None else out + wave
    return out * np.float32(0.5 * np.sqrt(2.0 / _NOISE_MODES))


def _perturbed_inside(rng: np.random.Generator, r: np.ndarray, coords: Sequence[np.ndarray], deform: float,
                      extent: float) -> np.ndarray:
    """``r < 1 + deform * noise(coords)``, evaluating the noise only where the answer depends on it."""
    margin = deform * _NOISE_BOUND
    inside = r < 1.0 - margin
    band = (r < 1.0 + margin) & ~inside
    pts = [np.broadcast_to(c, r.shape)[band] for c in coords]
    inside[band] = r[band] < 1.0 + deform * _noise_field(rng, pts, extent)
    return inside


def _rotation(rng: np.random.Generator, yaw_deg: float, jitter_deg: float) -> np.ndarray:
    """Rotation matrix: a yaw about z plus small random tilts (degrees)."""
    a, b, c = np.deg2rad([yaw_deg + rng.uniform(-jitter_deg, jitter_deg), rng.uniform(-jitter_deg, jitter_deg),
                          rng.uniform(-jitter_deg, jitter_deg)])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    return (rz @ ry @ rx).astype(np.float32)


def _ellipsoid(grid: _Grid, rng: np.random.Generator, center, semi, yaw: float = 0.0, deform: float = 0.15,
               jitter: float = 6.0) -> tuple[tuple[slice, slice, slice] | None, np.ndarray | None]:
    """A randomly deformed ellipsoid in reference mm: (voxel box, bool mask inside the box)."""
    c = np.asarray(center, np.float32) + rng.uniform(-jitter, jitter, 3).astype(np.float32)
    a = np.asarray(semi, np.float32) * rng.uniform(0.88, 1.12, 3).astype(np.float32)
    rot = _rotation(rng, yaw, 8.0)
    reach = float(a.max()) * (1.0 + _NOISE_BOUND * deform) + 2.0
    box = grid.box(c - reach, c + reach)
    if box is None:
        return None, None
    x, y, z = grid.ref_mesh(box)
    d = (x - c[0], y - c[1], z - c[2])
    # local coordinates q = R^T d / a
    q = [(rot[0, k] * d[0] + rot[1, k] * d[1] + rot[2, k] * d[2]) / a[k] for k in range(3)]
    r = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2)
    return box, _perturbed_inside(rng, r, q, deform, extent=1.0)


def _tube(grid: _Grid, rng: np.random.Generator, points, radii, deform: float = 0.1,
          jitter: float = 4.0) -> tuple[tuple[slice, slice, slice] | None, np.ndarray | None]:
    """A tube of varying radius around a polyline (reference mm): (voxel box, bool mask in the box)."""
    p = np.asarray(points, np.float32) + rng.uniform(-jitter, jitter, (len(points), 3)).astype(np.float32)
    rad = np.asarray(radii, np.float32) * rng.uniform(0.85, 1.15, len(points)).astype(np.float32)
    reach = float(rad.max()) * (1.0 + _NOISE_BOUND * deform) + 2.0
    box = grid.box(p.min(0) - reach, p.max(0) + reach)
    if box is None:
        return None, None
    x, y, z = grid.ref_mesh(box)
    shape = (x.shape[0], y.shape[1], z.shape[2])
    ratio = np.full(shape, np.inf, np.float32)
    for k in range(len(p) - 1):
        a, b = p[k], p[k + 1]
        ab = b - a
        t = ((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / float(ab @ ab)
        t = np.clip(t, 0.0, 1.0)
        dist = np.sqrt((x - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (z - a[2] - t * ab[2]) ** 2)
        np.minimum(ratio, dist / (rad[k] + t * (rad[k + 1] - rad[k])), out=ratio)
    scale = np.float32(40.0)
    m = p.mean(0)
    return box, _perturbed_inside(rng, ratio, ((x - m[0]) / scale, (y - m[1]) / scale, (z - m[2]) / scale), deform,
                                  extent=1.0)


def _diaphragm(x: np.ndarray, y: np.ndarray, apex_r: float, apex_l: float) -> np.ndarray:
    """Reference z (mm) of the diaphragm surface above point (x, y): two domes, right higher."""
    def dome(xc: float, apex: float) -> np.ndarray:
        return apex - 55.0 * ((x - xc) / 95.0) ** 2 - 35.0 * ((y + 5.0) / 90.0) ** 2 - 25.0 * np.clip(-(y + 30.0) / 60.0, 0, None)
    return np.maximum(dome(60.0, apex_r), dome(-60.0, apex_l))


def make_phantom(
    seed: int | Sequence[int] = 0,
    *,
    inplane_voxels: tuple[int, int] = (96, 160),
    inplane_spacing: tuple[float, float] = (2.0, 3.0),
    slice_spacing: tuple[float, float] = (2.5, 5.0),
    orientation: str | None = None,
) -> Phantom:
    """Build one phantom (deterministic for ``seed``).

    Args:
        seed: seed (or seed sequence) of the volume's random generator.
        inplane_voxels: (min, max) voxels along x and y; the field of view is chosen to contain
            the body, then the in-plane spacing follows from a target drawn in ``inplane_spacing``.
        inplane_spacing: (min, max) target in-plane spacing in mm.
        slice_spacing: (min, max) slice spacing in mm.
        orientation: storage axis codes (e.g. "LPS"); None draws one from ``ORIENTATIONS``.

    Returns:
        ``Phantom`` with int16 HU image (X, Y, Z) and uint8 label (X, Y, Z), both in RAS order.
    """
    if inplane_voxels[0] < 8 or inplane_voxels[1] < inplane_voxels[0]:
        raise ValueError(f"inplane_voxels must be (min, max) with 8 <= min <= max, got {inplane_voxels}")
    for name, rng_ in (("inplane_spacing", inplane_spacing), ("slice_spacing", slice_spacing)):
        if not (0 < rng_[0] <= rng_[1]):
            raise ValueError(f"{name} must be (min, max) with 0 < min <= max, got {rng_}")
    rng = np.random.default_rng(seed)

    # ---- geometry -------------------------------------------------------------------------
    s0 = rng.uniform(0.85, 1.1)
    scale = np.array([s0 * rng.uniform(0.95, 1.05), s0 * rng.uniform(0.92, 1.08), s0 * rng.uniform(0.9, 1.1)])
    fov = 2 * _BODY_AX * scale[0] * rng.uniform(1.12, 1.35)
    n_xy = int(np.clip(round(fov / rng.uniform(*inplane_spacing)), *inplane_voxels))
    sp_xy = fov / n_xy
    sp_z = rng.uniform(*slice_spacing)
    z_lo, z_hi = rng.uniform(-150.0, -110.0) * scale[2], rng.uniform(125.0, 170.0) * scale[2]
    n_z = max(int(round((z_hi - z_lo) / sp_z)), 4)
    shape = (n_xy, n_xy, n_z)
    spacing = np.array([sp_xy, sp_xy, sp_z])
    origin = np.array([-fov / 2 + rng.uniform(-0.02, 0.02) * fov, -fov / 2 + rng.uniform(-0.02, 0.03) * fov, z_lo])
    grid = _Grid(shape, spacing, origin, scale)
    if orientation is None:
        orientation = ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))]

    full = (slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2]))
    X, Y, Z = grid.ref_mesh(full)
    X2, Y2 = X[:, :, 0], Y[:, :, 0]  # (nx,1), (1,ny)
    theta = np.arctan2(Y2 / _BODY_AY, X2 / _BODY_AX)

    hu = np.full(shape, -1000.0, np.float32)
    label = np.zeros(shape, np.uint8)
    jit = lambda s: float(rng.normal(0.0, s))  # noqa: E731  per-volume contrast jitter

    # ---- body wall: skin / fat, muscle, cavity (2D masks broadcast over z) -----------------
    lump = 1.0 + 0.03 * np.sin(3 * theta + rng.uniform(0, 6.3)) + 0.02 * np.sin(5 * theta + rng.uniform(0, 6.3))
    def ell(ax: float, ay: float, cx: float = 0.0, cy: float = 0.0, p: float = 2.0) -> np.ndarray:
        return (np.abs((X2 - cx) / ax) ** p + np.abs((Y2 - cy) / ay) ** p) ** (1.0 / p)
    fat_t = rng.uniform(10.0, 30.0)
    body2 = ell(_BODY_AX, _BODY_AY, p=2.3) < lump
    muscle2 = ell(_BODY_AX - fat_t, _BODY_AY - fat_t, p=2.3) < lump
    cav_rho = ell(_BODY_AX - fat_t - _MUSCLE_WALL, _BODY_AY - fat_t - _MUSCLE_WALL, p=2.3) / lump
    cavity2 = cav_rho < 1.0
    paraspinal2 = ell(50.0, 30.0, 0.0, -88.0) < 1.0
    hu[np.broadcast_to(body2[:, :, None], shape)] = -100.0 + jit(8)
    hu[np.broadcast_to(muscle2[:, :, None], shape)] = 45.0 + jit(5)
    # visceral fat / bowel mixture: a smooth random field
    mix = np.zeros(shape, np.float32)
    for _ in range(6):  # separable low-frequency waves: cheap on the full grid
        waves = [np.cos(c * rng.uniform(0.02, 0.06) + rng.uniform(0, 2 * np.pi)).astype(np.float32) for c in (X, Y, Z)]
        mix += waves[0] * waves[1] * waves[2]
    mix *= 1.0 / (mix.std() + 1e-6)
    cav3 = np.broadcast_to(cavity2[:, :, None], shape)
    hu[cav3] = (-35.0 + 55.0 * np.tanh(mix))[cav3]
    hu[np.broadcast_to(paraspinal2[:, :, None], shape)] = 45.0 + jit(5)
    psoas = (((np.abs(X) - 38.0) / 16.0) ** 2 + ((Y + 48.0) / 16.0) ** 2 < 1.0) & (Z < 10.0)
    hu[psoas] = 45.0

    # ---- spine ------------------------------------------------------------------------------
    period, disc = 28.0, 6.0
    zphase = np.mod(Z - rng.uniform(0, period), period)  # (1,1,nz)
    in_disc = zphase < disc
    r_body = np.sqrt(((X2 - _SPINE_C[0]) / 22.0) ** 2 + ((Y2 - _SPINE_C[1]) / 18.0) ** 2)  # (nx,ny)
    vb = r_body[:, :, None] < 1.0
    cortical = vb & (r_body[:, :, None] > 0.82)
    canal2 = np.sqrt(X2**2 + (Y2 + 83.0) ** 2) < 9.0
    ring = (np.sqrt(X2**2 + (Y2 + 83.0) ** 2) < 15.0) & ~canal2 & (Y2 < -78.0)
    spinous = (np.abs(X2) < 5.0) & (Y2 < -90.0) & (Y2 > -112.0)
    post2 = ring | spinous
    transverse = (np.abs(X2) > 14.0) & (np.abs(X2) < 45.0) & (np.abs(Y2 + 78.0) < 5.0)
    mid = (zphase > disc + 6.0) & (zphase < period - 6.0)
    bone = (vb | post2[:, :, None] | (transverse[:, :, None] & mid)) & ~in_disc | (vb & in_disc)
    hu[bone] = 220.0 + jit(15)  # cancellous
    hu[cortical & ~in_disc] = 600.0 + jit(40)
    hu[(post2[:, :, None] | (transverse[:, :, None] & mid)) & ~in_disc] = 480.0 + jit(30)
    hu[vb & in_disc] = 80.0
    hu[np.broadcast_to(canal2[:, :, None], shape)] = 15.0

    # ---- lungs, heart, ribs -----------------------------------------------------------------
    apex_r, apex_l = rng.uniform(105.0, 120.0), rng.uniform(95.0, 110.0)
    zd = _diaphragm(X2, Y2, apex_r, apex_l)[:, :, None]  # (nx,ny,1)
    above = Z > zd
    mediastinum = ((((X2 + 8.0) / 40.0) ** 2 + ((Y2 - 15.0) / 62.0) ** 2 < 1.0) & (Y2 > -45.0))[:, :, None]
    lungs = above & cav3 & ~mediastinum & ~np.broadcast_to(paraspinal2[:, :, None], shape) & ~bone
    hu[lungs] = -850.0 + jit(20)
    hu[above & cav3 & mediastinum] = -60.0
    hbox, heart = _ellipsoid(grid, rng, (-15.0, 40.0, 175.0), (60.0, 45.0, 55.0), deform=0.08)
    if hbox is not None:
        sel = heart & above[hbox] & cav3[hbox]
        hu[hbox][sel] = 120.0 + jit(10)

    rib_d = (cav_rho - 1.0) * 0.5 * (_BODY_AX + _BODY_AY - 2 * fat_t - 2 * _MUSCLE_WALL)  # ~mm outside cavity
    phi = np.arccos(np.clip(-np.sin(theta), -1, 1))  # 0 at the back, pi at the front
    rib_period, rib_slope = 32.0, 45.0
    zr = Z + rib_slope * (1.0 - np.cos(phi))[:, :, None] - rng.uniform(0, rib_period)
    k = np.floor(zr / rib_period + 0.5)
    z0 = k * rib_period  # rib's height at the back (reference frame shifted)
    on_rib = (np.abs(zr - z0) < 5.0) & (np.abs(rib_d - 5.0) < 4.0)[:, :, None]
    reach = np.where(z0 < 30.0, 0.55 * np.pi, 0.85 * np.pi)
    ribs = on_rib & (phi[:, :, None] < reach) & (z0 > -40.0) & (np.abs(X2) > 35.0)[:, :, None]  # end at the spine
    hu[ribs] = 550.0 + jit(40)

    # ---- organs -----------------------------------------------------------------------------
    organ_ok = cav3 & ~np.broadcast_to(paraspinal2[:, :, None], shape) & ~bone
    below = organ_ok & ~above
    tex = {}

    def paint(lab: int, box, mask, allowed: np.ndarray, hu_value: float | None = None) -> None:
        if box is None:
            return
        sel = mask & allowed[box]
        label[box][sel] = lab
        base = ORGAN_HU[lab] if hu_value is None else hu_value
        if lab not in tex:
            tex[lab] = base + jit(6)
        region = hu[box]
        region[sel] = tex[lab]

    b1, m1 = _ellipsoid(grid, rng, (70.0, 0.0, 55.0), (75.0, 85.0, 75.0), deform=0.15)  # liver, right lobe
    b2, m2 = _ellipsoid(grid, rng, (-5.0, 45.0, 65.0), (50.0, 32.0, 35.0), deform=0.15)  # left lobe
    paint(6, b1, m1, below)
    paint(6, b2, m2, below)
    paint(1, *_ellipsoid(grid, rng, (-82.0, -40.0, 55.0), (25.0, 50.0, 45.0), yaw=-35.0, deform=0.12), below)
    sb, sm = _ellipsoid(grid, rng, (-50.0, 35.0, 55.0), (40.0, 45.0, 45.0), yaw=20.0, deform=0.12)
    paint(7, sb, sm, below)
    paint(7, *_ellipsoid(grid, rng, (0.0, 50.0, 20.0), (42.0, 20.0, 20.0), deform=0.1), below)
    if sb is not None:  # anterior (non-dependent, patient supine) gas pocket in the stomach
        _, sy, _ = grid.ref_mesh(sb)
        ymax = np.where(label[sb] == 7, sy, -np.inf).max()
        gas = (label[sb] == 7) & (sy > ymax - rng.uniform(10.0, 18.0))
        hu[sb][gas] = -900.0 + jit(20)
    paint(2, *_ellipsoid(grid, rng, (72.0, -42.0, -15.0), (27.0, 24.0, 52.0), yaw=-25.0, deform=0.08), below)
    paint(3, *_ellipsoid(grid, rng, (-72.0, -42.0, -8.0), (27.0, 24.0, 52.0), yaw=25.0, deform=0.08), below)
    paint(11, *_tube(grid, rng, [(-78.0, -15.0, 35.0), (-30.0, 12.0, 22.0), (20.0, 10.0, 8.0), (30.0, 15.0, -8.0)],
                     [9.0, 11.0, 15.0, 14.0], deform=0.15), below)
    paint(4, *_ellipsoid(grid, rng, (58.0, 50.0, 5.0), (16.0, 18.0, 30.0), yaw=15.0, deform=0.08), below)
    paint(10, *_tube(grid, rng, [(-72.0, -28.0, 38.0), (-25.0, -4.0, 24.0), (12.0, -4.0, 22.0), (45.0, 8.0, 48.0)],
                     [5.0, 6.0, 7.5, 7.0], deform=0.1, jitter=2.0), below)
    paint(9, *_tube(grid, rng, [(24.0, -18.0, -160.0), (24.0, -14.0, 40.0), (30.0, -8.0, 110.0)], [11.0, 12.0, 13.0],
                    deform=0.08, jitter=2.0), organ_ok)
    paint(8, *_tube(grid, rng, [(-16.0, -22.0, -160.0), (-15.0, -22.0, 60.0), (-12.0, -26.0, 220.0)],
                    [10.0, 11.0, 12.0], deform=0.05, jitter=2.0), organ_ok)
    paint(5, *_tube(grid, rng, [(2.0, 2.0, 230.0), (-10.0, 0.0, 112.0), (-35.0, 16.0, 92.0)], [8.0, 8.0, 9.0],
                    deform=0.1, jitter=2.0), organ_ok)
    paint(12, *_ellipsoid(grid, rng, (42.0, -28.0, 48.0), (5.0, 14.0, 18.0), yaw=-30.0, deform=0.1, jitter=3.0), below)
    paint(13, *_ellipsoid(grid, rng, (-44.0, -28.0, 42.0), (5.0, 14.0, 18.0), yaw=30.0, deform=0.1, jitter=3.0), below)

    # An organ too small for a coarse grid still gets its nearest voxel, so every label exists.
    present = np.bincount(label.ravel(), minlength=14)
    for lab in range(1, 14):
        if present[lab] == 0:
            logger.debug("label %d empty at this resolution; marking one voxel", lab)
            _mark_one(label, hu, lab, organ_ok, grid, ORGAN_HU[lab])

    # ---- noise and smoothing ----------------------------------------------------------------
    smooth = rng.uniform(0.5, 0.8)
    hu = ndimage.gaussian_filter(hu, (smooth, smooth, smooth * 0.6))
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 0.5)
    noise *= rng.uniform(10.0, 20.0) / (noise.std() + 1e-6)
    hu += noise
    image = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)
    affine[:3, 3] = origin + rng.uniform(-200.0, 200.0, 3)  # scanner table position
    info = {"shape": list(shape), "spacing": [float(s) for s in spacing], "orientation": orientation,
            "scale": [float(s) for s in scale]}
    return Phantom(image=image, label=label, affine=affine, orientation=orientation, info=info)


_ORGAN_CENTERS = MappingProxyType({1: (-82, -40, 55), 2: (72, -42, -15), 3: (-72, -42, -8), 4: (58, 50, 5), 5: (-10, 0, 112),
                  6: (70, 0, 55), 7: (-50, 35, 55), 8: (-15, -22, 0), 9: (24, -14, 0), 10: (-10, -4, 23),
                  11: (-30, 12, 22), 12: (42, -28, 48), 13: (-44, -28, 42)})


def _mark_one(label: np.ndarray, hu: np.ndarray, lab: int, allowed: np.ndarray, grid: _Grid, value: float) -> None:
    """Label the allowed voxel nearest to the organ's reference centre."""
    c = np.asarray(_ORGAN_CENTERS[lab], np.float64) * grid.scale
    idx = np.clip(np.rint((c - grid.origin) / grid.spacing).astype(int), 0, np.array(grid.shape) - 1)
    cand = np.argwhere(allowed & (label == 0))
    if len(cand) == 0:
        return
    best = tuple(cand[np.argmin(((cand - idx) ** 2).sum(1))])
    label[best] = lab
    hu[best] = value


def _to_nifti_bytes(data: np.ndarray, affine_ras: np.ndarray, orientation: str, dtype) -> bytes:
    """Reorient RAS-ordered ``data`` to ``orientation`` and serialise as a gzip NIfTI-1 (deterministic)."""
    import nibabel as nib
    from nibabel.orientations import axcodes2ornt, ornt_transform

    img = nib.Nifti1Image(data.astype(dtype), affine_ras)
    img = img.as_reoriented(ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(tuple(orientation))))
    img.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    img.header["scl_slope"], img.header["scl_inter"] = 1.0, 0.0
    return gzip.compress(img.to_bytes(), compresslevel=4, mtime=0)


def _write_case(args: tuple) -> dict:
    out, name, seed_seq, labeled, kwargs = args
    ph = make_phantom(seed_seq, **kwargs)
    with open(os.path.join(out, "imagesTr", name), "wb") as f:
        f.write(_to_nifti_bytes(ph.image, ph.affine, ph.orientation, np.int16))
    if labeled:
        with open(os.path.join(out, "labelsTr", name), "wb") as f:
            f.write(_to_nifti_bytes(ph.label, ph.affine, ph.orientation, np.uint8))
    return {"name": name, **ph.info}


def synth_dataset(
    out: str,
    num: int = 20,
    seed: int = 0,
    *,
    unlabeled: bool = False,
    prefix: str = "synth",
    workers: int = 1,
    inplane_voxels: tuple[int, int] = (96, 160),
    inplane_spacing: tuple[float, float] = (2.0, 3.0),
    slice_spacing: tuple[float, float] = (2.5, 5.0),
    orientations: Sequence[str] | None = None,
) -> dict:
    """Write ``num`` phantoms as a Medical Segmentation Decathlon style folder.

    Layout: ``out/imagesTr/<prefix>_NNN.nii.gz`` (int16 HU), ``out/labelsTr/<prefix>_NNN.nii.gz``
    (uint8, BTCV ids; absent with ``unlabeled``) and ``out/dataset.json``. Volume i uses the seed
    sequence (seed, i), so a volume does not depend on ``num``. Orientations cycle through
    ``orientations`` (default ``ORIENTATIONS``: RAS, LPS, flips) from a seed-dependent start.

    Returns:
        The dataset.json content; its extra key "synthetic" lists each case's shape, spacing and
        storage orientation.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    orients = tuple(orientations) if orientations else ORIENTATIONS
    for o in orients:
        if len(o) != 3 or sorted(set(o.upper()) & set("RLAPSI")) != sorted(o.upper()):
            raise ValueError(f"bad orientation code {o!r}: expected 3 letters like 'RAS' or 'LPS'")
    os.makedirs(os.path.join(out, "imagesTr"), exist_ok=True)
    if not unlabeled:
        os.makedirs(os.path.join(out, "labelsTr"), exist_ok=True)
    kw = dict(inplane_voxels=tuple(inplane_voxels), inplane_spacing=tuple(inplane_spacing),
              slice_spacing=tuple(slice_spacing))
    start = int(np.random.default_rng(seed).integers(len(orients)))
    jobs = [(out, f"{prefix}_{i:03d}.nii.gz", [seed, i], not unlabeled,
             {**kw, "orientation": orients[(start + i) % len(orients)].upper()}) for i in range(num)]
    if workers > 1 and num > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=min(workers, num)) as pool:
            infos = list(pool.map(_write_case, jobs))
    else:
        infos = [_write_case(j) for j in jobs]
    for info in infos:
        logger.debug("wrote %s %s", info["name"], info)

    training = []
    for info in infos:
        entry = {"image": f"./imagesTr/{info['name']}"}
        if not unlabeled:
            entry["label"] = f"./labelsTr/{info['name']}"
        training.append(entry)
    meta = {
        "name": "MambaMIM synthetic abdomen CT" + (" (unlabeled)" if unlabeled else ""),
        "description": "Synthetic abdominal CT phantoms with BTCV-style organ labels (mambamim data synth)",
        "reference": "synthetic",
        "licence": "CC0",
        "release": "1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background"} if unlabeled else {str(k): v for k, v in BTCV_LABELS.items()},
        "numTraining": num,
        "numTest": 0,
        "training": training,
        "test": [],
        "synthetic": {"seed": seed, "cases": infos},
    }
    with open(os.path.join(out, "dataset.json"), "w") as f:
        json.dump(meta, f, indent=1)
    logger.debug("wrote %d synthetic volumes to %s", num, out)
    return meta
