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
from typing import Any, Mapping, NamedTuple, Sequence

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


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float],
                  corr_mm: float) -> np.ndarray:
    """Stationary smooth Gaussian random field, float32 ``shape``, correlation length about ``corr_mm``.

    White noise on a lattice is interpolated with a separable Gaussian kernel by three small matrix
    products (much cheaper than filtering the full grid). Each axis's kernel is widened by the voxel
    size and the variance reduced accordingly (unit variance when voxels are much finer than
    ``corr_mm``), so a texture finer than the voxels averages out as partial volume would.
    """
    sigma = 0.5 * corr_mm
    mats = []
    for n, s in zip(shape, spacing):
        sig = float(np.hypot(sigma, 0.4 * s))
        nodes = np.arange(-3.0 * sig, n * s + 3.0 * sig, sig)
        w = np.exp(-0.5 * ((np.arange(n)[:, None] * s - nodes[None, :]) / sig) ** 2)
        w *= np.sqrt(sigma / sig) / np.linalg.norm(w, axis=1, keepdims=True)
        mats.append(w.astype(np.float32))
    g = rng.standard_normal([m.shape[1] for m in mats]).astype(np.float32)
    f = (mats[0] @ g.reshape(g.shape[0], -1)).reshape(shape[0], g.shape[1], g.shape[2])
    return np.matmul(mats[1], f) @ mats[2].T


def _rotation(rng: np.random.Generator, yaw_deg: float, jitter_deg: float) -> np.ndarray:
    """Rotation matrix: a yaw about z plus small random tilts (degrees)."""
    a, b, c = np.deg2rad([yaw_deg + rng.uniform(-jitter_deg, jitter_deg), rng.uniform(-jitter_deg, jitter_deg),
                          rng.uniform(-jitter_deg, jitter_deg)])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    return (rz @ ry @ rx).astype(np.float32)


class _Shape(NamedTuple):
    """A shape on the grid: voxel ``box``, bool ``inside`` (its voxels) and normalised distance ``r`` (1 on the
    undeformed surface) inside the box, and the jittered ``center`` (reference mm); box None if off-grid."""

    box: tuple[slice, slice, slice] | None
    inside: np.ndarray | None
    r: np.ndarray | None
    center: np.ndarray


def _ellipsoid(grid: _Grid, rng: np.random.Generator, center, semi, yaw: float = 0.0, deform: float = 0.15,
               jitter: float = 6.0, size: float = 1.0, vary: float = 0.18) -> _Shape:
    """A randomly deformed ellipsoid in reference mm, semi-axes ``semi`` times ``size`` and +-``vary``."""
    c = np.asarray(center, np.float32) + rng.uniform(-jitter, jitter, 3).astype(np.float32)
    a = np.asarray(semi, np.float32) * np.float32(size) * rng.uniform(1.0 - vary, 1.0 + vary, 3).astype(np.float32)
    rot = _rotation(rng, yaw, 10.0)
    reach = float(a.max()) * (1.0 + _NOISE_BOUND * deform) + 2.0
    box = grid.box(c - reach, c + reach)
    if box is None:
        return _Shape(None, None, None, c)
    x, y, z = grid.ref_mesh(box)
    d = (x - c[0], y - c[1], z - c[2])
    # local coordinates q = R^T d / a
    q = [(rot[0, k] * d[0] + rot[1, k] * d[1] + rot[2, k] * d[2]) / a[k] for k in range(3)]
    r = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2)
    return _Shape(box, _perturbed_inside(rng, r, q, deform, extent=1.0), r, c)


def _tube(grid: _Grid, rng: np.random.Generator, points, radii, deform: float = 0.1, jitter: float = 4.0) -> _Shape:
    """A tube of varying radius around a polyline (reference mm); ``r`` is distance / local radius."""
    p = np.asarray(points, np.float32) + rng.uniform(-jitter, jitter, (len(points), 3)).astype(np.float32)
    rad = np.asarray(radii, np.float32) * rng.uniform(0.85, 1.15, len(points)).astype(np.float32)
    reach = float(rad.max()) * (1.0 + _NOISE_BOUND * deform) + 2.0
    box = grid.box(p.min(0) - reach, p.max(0) + reach)
    if box is None:
        return _Shape(None, None, None, p.mean(0))
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
    inside = _perturbed_inside(rng, ratio, ((x - m[0]) / scale, (y - m[1]) / scale, (z - m[2]) / scale), deform,
                               extent=1.0)
    return _Shape(box, inside, ratio, m)


def _diaphragm(x: np.ndarray, y: np.ndarray, apex_r: float, apex_l: float) -> np.ndarray:
    """Reference z (mm) of the diaphragm surface above point (x, y): two domes, right higher."""
    def dome(xc: float, apex: float) -> np.ndarray:
        return apex - 55.0 * ((x - xc) / 95.0) ** 2 - 35.0 * ((y + 5.0) / 90.0) ** 2 - 25.0 * np.clip(-(y + 30.0) / 60.0, 0, None)
    return np.maximum(dome(60.0, apex_r), dome(-60.0, apex_l))


class _Canvas:
    """The phantom under construction: HU (float32) and label volumes, coordinates, texture fields.

    Textures are unit-variance smooth random fields over the whole grid: ``fine`` (about 6 mm),
    ``coarse`` (about 16 mm), and ``a``/``b`` (about 40 mm) whose joint zero set gives tubes
    (bowel loops, liver and lung vessels).
    """

    def __init__(self, rng: np.random.Generator, grid: _Grid):
        self.rng, self.grid = rng, grid
        shape = grid.shape
        self.hu = np.full(shape, -1000.0, np.float32)
        self.label = np.zeros(shape, np.uint8)
        self.X, self.Y, self.Z = grid.ref_mesh(tuple(slice(0, n) for n in shape))
        sp = grid.spacing / grid.scale  # reference mm per voxel
        self.tex = {name: _smooth_field(rng, shape, sp, corr) for name, corr in
                    (("fine", 6.0), ("coarse", 16.0), ("a", 40.0), ("b", 40.0))}
        self.regions: dict[str, Any] = {}  # regions and geometry shared between the anatomy steps

    def jit(self, s: float) -> float:
        """Per-volume contrast jitter: one normal draw with std ``s`` (HU)."""
        return float(self.rng.normal(0.0, s))

    def full(self, m2: np.ndarray) -> np.ndarray:
        """An (nx, ny, 1) or (nx, ny, nz) region broadcast to the grid (read-only view)."""
        return np.broadcast_to(m2 if m2.ndim == 3 else m2[:, :, None], self.grid.shape)

    def fill(self, sel: np.ndarray, base: float, fine: float = 0.0, coarse: float = 0.0,
             box: tuple[slice, slice, slice] | None = None) -> None:
        """Set HU ``base + fine * tex_fine + coarse * tex_coarse`` where ``sel`` (within ``box``)."""
        box = box or (slice(None),) * 3
        region = self.hu[box]
        region[sel] = base + fine * self.tex["fine"][box][sel] + coarse * self.tex["coarse"][box][sel]

    def tubes(self, width: float, box: tuple[slice, slice, slice] | None = None) -> np.ndarray:
        """Normalised distance to the tube network (< 1 inside tubes of half-width ``width`` field units)."""
        box = box or (slice(None),) * 3
        return np.hypot(self.tex["a"][box], self.tex["b"][box]) / np.float32(width)


def _geometry(rng: np.random.Generator, inplane_voxels, inplane_spacing, slice_spacing) -> _Grid:
    """Draw the patient scale, field of view, voxel grid and spacing."""
    s0 = rng.uniform(0.85, 1.1)
    scale = np.array([s0 * rng.uniform(0.95, 1.05), s0 * rng.uniform(0.92, 1.08), s0 * rng.uniform(0.9, 1.1)])
    fov = 2 * _BODY_AX * scale[0] * rng.uniform(1.12, 1.35)
    n_xy = int(np.clip(round(fov / rng.uniform(*inplane_spacing)), *inplane_voxels))
    sp_xy = fov / n_xy
    sp_z = rng.uniform(*slice_spacing)
    z_lo, z_hi = rng.uniform(-150.0, -110.0) * scale[2], rng.uniform(125.0, 170.0) * scale[2]
    n_z = max(int(round((z_hi - z_lo) / sp_z)), 4)
    origin = np.array([-fov / 2 + rng.uniform(-0.02, 0.02) * fov, -fov / 2 + rng.uniform(-0.02, 0.03) * fov, z_lo])
    return _Grid((n_xy, n_xy, n_z), np.array([sp_xy, sp_xy, sp_z]), origin, scale)


def _body(cv: _Canvas) -> None:
    """Skin outline, subcutaneous fat, abdominal wall and back muscles, visceral fat (all with texture)."""
    rng, X2, Y2 = cv.rng, cv.X[:, :, 0], cv.Y[:, :, 0]
    theta = np.arctan2(Y2 / _BODY_AY, X2 / _BODY_AX)
    lump = 1.0 + sum(rng.uniform(0.0, 0.035) * np.sin(k * theta + rng.uniform(0, 6.3)) for k in (2, 3, 5))
    flat = 1.0 + rng.uniform(0.0, 0.15) * (Y2 < 0)  # flatter back (supine on the table)

    def ell(ax: float, ay: float, cy: float = 0.0, p: float = 2.3) -> np.ndarray:
        return (np.abs(X2 / ax) ** p + np.abs((Y2 - cy) * flat / ay) ** p) ** (1.0 / p) / lump
    fat_lat, fat_ant, fat_post = rng.uniform(8.0, 32.0), rng.uniform(8.0, 40.0), rng.uniform(5.0, 18.0)
    wall = rng.uniform(9.0, 15.0)
    ay_m, cy_m = _BODY_AY - 0.5 * (fat_ant + fat_post), 0.5 * (fat_post - fat_ant)
    body2, muscle2 = ell(_BODY_AX, _BODY_AY) < 1.0, ell(_BODY_AX - fat_lat, ay_m, cy_m) < 1.0
    cavity2 = ell(_BODY_AX - fat_lat - wall, ay_m - wall, cy_m) < 1.0
    paraspinal2 = (X2 / 50.0) ** 2 + ((Y2 + 88.0) / 30.0) ** 2 < 1.0
    septa = np.abs(cv.tex["coarse"]) < 0.08  # fat stranding: thin sheets
    fat = cv.full(body2) & ~cv.full(muscle2)
    cv.fill(fat, -105.0 + cv.jit(8), fine=6.0)
    cv.fill(fat & septa, -30.0 + cv.jit(15), fine=10.0)
    muscle = cv.full((muscle2 & ~cavity2) | paraspinal2)
    cv.fill(muscle, 50.0 + cv.jit(5), fine=5.0)
    cv.fill(muscle & (cv.tex["fine"] > 1.6), -60.0, fine=10.0)  # intramuscular fat
    cav3 = cv.full(cavity2 & ~paraspinal2)
    cv.fill(cav3, -95.0 + cv.jit(8), fine=6.0)
    cv.fill(cav3 & septa, 20.0 + cv.jit(15), fine=10.0)  # mesenteric vessels and septa
    widen = 1.0 + 0.3 * np.clip(-cv.Z / 150.0, 0, 1)  # psoas grows caudally
    psoas = ((np.abs(cv.X) - 38.0) / 16.0) ** 2 + ((cv.Y + 48.0) / 16.0) ** 2 < widen ** 2
    psoas = psoas & (cv.Z < 10.0)
    cv.fill(psoas, 50.0 + cv.jit(5), fine=5.0)
    cv.regions.update(cav3=cav3, psoas=psoas, paraspinal=cv.full(paraspinal2), theta=theta,
                    cav_rho=ell(_BODY_AX - fat_lat - wall, ay_m - wall, cy_m),
                    wall_r=0.5 * (_BODY_AX - fat_lat - wall + ay_m - wall))


def _spine(cv: _Canvas) -> np.ndarray:
    """Vertebrae (cortical shell, textured cancellous bone, posterior arch), discs, canal; returns bone."""
    rng, X2, Y2, Z = cv.rng, cv.X[:, :, 0], cv.Y[:, :, 0], cv.Z
    period, disc = rng.uniform(26.0, 31.0), rng.uniform(5.0, 8.0)
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
    arch = (post2[:, :, None] | (transverse[:, :, None] & mid)) & ~in_disc
    bone = vb & ~in_disc | arch
    cv.fill(cv.full(bone), 210.0 + cv.jit(25), fine=35.0)  # cancellous
    cv.fill(cv.full(cortical & ~in_disc), 600.0 + cv.jit(40), fine=40.0)
    cv.fill(cv.full(arch), 450.0 + cv.jit(30), fine=60.0)
    cv.fill(cv.full(vb & in_disc), 85.0 + cv.jit(8), fine=5.0)
    cv.fill(cv.full(canal2), 15.0, fine=3.0)
    return cv.full(bone | (vb & in_disc))


def _pelvis(cv: _Canvas) -> np.ndarray:
    """Iliac wings below the iliac crest (when the grid reaches it): curved plates; returns bone."""
    rng = cv.rng
    crest = rng.uniform(-110.0, -80.0)
    depth = np.clip(crest - cv.Z, 0.0, None)  # (1,1,nz) mm below the crest
    shrink = 1.0 - np.clip(depth / 200.0, 0.0, 0.5)
    ax, ay = rng.uniform(50.0, 65.0) * shrink, rng.uniform(65.0, 80.0) * shrink
    xl = np.abs(cv.X) - rng.uniform(50.0, 60.0)
    rho = np.sqrt((xl / ax) ** 2 + (cv.Y / ay) ** 2)
    plate = (np.abs(rho - 1.0) * 0.5 * (ax + ay) < 4.0 + 0.05 * depth) & (xl > -10.0) & (cv.Y < 10.0) & (depth > 0)
    cv.fill(plate, 260.0 + cv.jit(25), fine=60.0)
    rim = plate & (np.abs(rho - 1.0) * 0.5 * (ax + ay) > 1.5 + 0.05 * depth)
    cv.fill(rim, 550.0 + cv.jit(40), fine=40.0)
    return plate


def _thorax(cv: _Canvas, bone: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Diaphragm, lungs (textured, with vessels), mediastinum, heart, ribs and costal cartilage.

    Returns (above the diaphragm, rib region)."""
    rng, X2, Y2, Z = cv.rng, cv.X[:, :, 0], cv.Y[:, :, 0], cv.Z
    cav3 = cv.regions["cav3"]
    apex_r, apex_l = rng.uniform(100.0, 125.0), rng.uniform(92.0, 112.0)
    cv.regions["apex_shift"] = apex_r - 112.0
    above = Z > _diaphragm(X2, Y2, apex_r, apex_l)[:, :, None]
    mediastinum = ((((X2 + 8.0) / 40.0) ** 2 + ((Y2 - 15.0) / 62.0) ** 2 < 1.0) & (Y2 > -45.0))[:, :, None]
    lungs = above & cav3 & ~mediastinum & ~bone
    cv.fill(lungs, -860.0 + cv.jit(25), fine=15.0, coarse=20.0)
    cv.hu[lungs] += 0.6 * np.broadcast_to(np.clip(-cv.Y - 20.0, 0, None), lungs.shape)[lungs]  # dependent density
    cv.fill(lungs & (cv.tubes(0.07) < 1.0), -150.0 + cv.jit(30), fine=40.0)  # pulmonary vessels
    cv.fill(above & cav3 & mediastinum, -70.0 + cv.jit(10), fine=8.0)
    heart = _ellipsoid(cv.grid, rng, (-15.0, 40.0, 175.0), (60.0, 45.0, 55.0), deform=0.08)
    if heart.box is not None:
        cv.fill(heart.inside & above[heart.box] & cav3[heart.box], 110.0 + cv.jit(15), fine=6.0, box=heart.box)
    ribs, cartilage = _ribs(cv)
    cv.fill(ribs, 500.0 + cv.jit(50), fine=80.0)
    cv.fill(cartilage, 115.0 + cv.jit(10), fine=8.0)
    return above, ribs | cartilage


def _ribs(cv: _Canvas) -> tuple[np.ndarray, np.ndarray]:
    """Rib bands sloping down from the back around the cavity: (bony ribs, anterior costal cartilage)."""
    rng, X2, Z = cv.rng, cv.X[:, :, 0], cv.Z
    theta, cav_rho = cv.regions["theta"], cv.regions["cav_rho"]
    rib_d = (cav_rho - 1.0) * cv.regions["wall_r"]  # ~mm outside the cavity
    phi = np.arccos(np.clip(-np.sin(theta), -1, 1))  # 0 at the back, pi at the front
    rib_period, rib_slope = rng.uniform(28.0, 35.0), rng.uniform(38.0, 52.0)
    zr = Z + rib_slope * (1.0 - np.cos(phi))[:, :, None] - rng.uniform(0, rib_period)
    z0 = np.floor(zr / rib_period + 0.5) * rib_period  # rib's height at the back (reference frame shifted)
    on_rib = (np.abs(zr - z0) < 5.0) & (np.abs(rib_d - 5.0) < 4.0)[:, :, None]
    reach = np.where(z0 < 30.0, 0.55 * np.pi, 0.85 * np.pi)
    ribs = on_rib & (phi[:, :, None] < reach) & (z0 > -40.0) & (np.abs(X2) > 35.0)[:, :, None]  # end at the spine
    cartilage = ribs & (phi[:, :, None] > reach - 0.2 * np.pi)
    return ribs & ~cartilage, cartilage


def _bowel(cv: _Canvas, allowed: np.ndarray) -> None:
    """Colon frame (gas and mottled stool) and small-bowel loops (wall, fluid contents, gas pockets)."""
    rng = cv.rng
    colon = _tube(cv.grid, rng, [(88.0, 0.0, -150.0), (90.0, 5.0, -40.0), (70.0, 40.0, -15.0), (0.0, 70.0, -25.0),
                                 (-70.0, 40.0, 5.0), (-95.0, 5.0, 5.0), (-95.0, 0.0, -110.0), (-40.0, 30.0, -160.0)],
                  [22.0, 24.0, 22.0, 20.0, 20.0, 18.0, 17.0, 16.0], deform=0.2, jitter=10.0)
    if colon.box is not None:
        b = colon.box
        sel = colon.inside & allowed[b]
        cv.fill(sel, 50.0 + cv.jit(10), fine=8.0, box=b)  # wall
        lumen = sel & (colon.r < 0.8)
        cv.fill(lumen, -20.0 + cv.jit(20), fine=50.0, box=b)  # stool
        cv.fill(lumen & (cv.tex["fine"][b] > 1.4), -700.0, fine=100.0, box=b)  # bubbles in stool
        cv.fill(lumen & (cv.tex["coarse"][b] > rng.uniform(-0.6, 0.6)), -930.0 + cv.jit(20), fine=20.0, box=b)  # gas
    top = rng.uniform(-40.0, 5.0)
    region = allowed & (cv.Z < top) & (np.abs(cv.X) < 90.0) & (cv.Y > -40.0)
    if colon.box is not None:
        region[colon.box] &= ~colon.inside
    rho = cv.tubes(rng.uniform(0.7, 1.0))
    loops = region & (rho < 1.0)
    cv.fill(loops, 60.0 + cv.jit(10), fine=6.0)  # enhancing wall
    lumen = loops & (rho < 0.7)
    contents = 15.0 + cv.jit(10) if rng.random() < 0.75 else rng.uniform(120.0, 250.0)  # water or oral contrast
    cv.fill(lumen, contents, fine=12.0)
    cv.fill(lumen & (cv.tex["coarse"] > rng.uniform(1.0, 2.0)), -930.0 + cv.jit(20), fine=20.0)


def _liver(cv: _Canvas, paint, below: np.ndarray) -> None:
    """Right and left lobes (moving with the diaphragm), brighter intrahepatic vessels."""
    rng, dz = cv.rng, cv.regions["apex_shift"]
    size = rng.uniform(0.88, 1.15)
    for center, semi in (((70.0, 0.0, 55.0 + dz), (75.0, 85.0, 75.0)), ((-5.0, 45.0, 65.0 + dz), (50.0, 32.0, 35.0))):
        paint(6, _ellipsoid(cv.grid, rng, center, semi, deform=0.2, jitter=8.0, size=size), below)
    liver = cv.label == 6
    vessels = liver & (cv.tubes(rng.uniform(0.06, 0.09)) < 1.0)
    cv.hu[vessels] += rng.uniform(40.0, 70.0)


def _kidney(cv: _Canvas, paint, below: np.ndarray, lab: int, center, yaw: float) -> None:
    """Kidney: cortex brighter than medulla, unlabelled renal sinus (fat and pelvis) at the medial hilum."""
    rng = cv.rng
    k = _ellipsoid(cv.grid, rng, center, (27.0, 24.0, 52.0), yaw=yaw, deform=0.08, jitter=8.0,
                   size=rng.uniform(0.9, 1.1))
    paint(lab, k, below, base=ORGAN_HU[lab] + 20.0 + cv.jit(6))
    if k.box is None:
        return
    b, kid = k.box, cv.label[k.box] == lab
    medulla = kid & (k.r + 0.12 * cv.tex["fine"][b] < 0.68)
    cv.hu[b][medulla] -= rng.uniform(25.0, 45.0)
    side = np.sign(center[0])
    sinus = _ellipsoid(cv.grid, rng, k.center + np.array([-side * 16.0, 6.0, 0.0], np.float32), (9.0, 8.0, 18.0),
                       deform=0.1, jitter=1.0)
    if sinus.box is not None:
        sel = sinus.inside & (cv.label[sinus.box] == lab)
        cv.label[sinus.box][sel] = 0
        cv.fill(sel, -70.0 + cv.jit(15), fine=10.0, box=sinus.box)
        cv.fill(sel & (sinus.r < 0.55), 10.0 + cv.jit(5), fine=3.0, box=sinus.box)  # pelvis (urine)


def _stomach(cv: _Canvas, paint, below: np.ndarray) -> None:
    """Stomach: enhancing wall, mottled contents, an anterior (non-dependent) gas pocket."""
    rng = cv.rng
    sb = _ellipsoid(cv.grid, rng, (-50.0, 35.0, 55.0 + 0.5 * cv.regions["apex_shift"]), (40.0, 45.0, 45.0), yaw=20.0,
                    deform=0.18, jitter=8.0, size=rng.uniform(0.85, 1.15))
    paint(7, sb, below, base=55.0 + cv.jit(8), fine=4.0)
    paint(7, _ellipsoid(cv.grid, rng, (0.0, 50.0, 20.0), (42.0, 20.0, 20.0), deform=0.12), below)
    if sb.box is None:
        return
    b = sb.box
    inner = (cv.label[b] == 7) & (sb.r < 0.85)
    cv.fill(inner, 30.0 + cv.jit(8), fine=12.0, box=b)  # food and fluid
    _, sy, _ = cv.grid.ref_mesh(b)
    stomach = cv.label[b] == 7
    ys = np.broadcast_to(sy, stomach.shape)[stomach]
    level = max(ys.max() - rng.uniform(8.0, 20.0), np.quantile(ys, 0.85)) if ys.size else np.inf
    gas = stomach & (sy > level)  # at most a fifth of the stomach
    cv.fill(gas, -900.0 + cv.jit(20), fine=10.0, box=b)


def _organs(cv: _Canvas, below: np.ndarray, organ_ok: np.ndarray) -> None:
    """The 13 BTCV organs with per-volume HU jitter and per-organ texture amplitudes."""
    rng, level = cv.rng, {}

    def paint(lab: int, s: _Shape, allowed: np.ndarray, base: float | None = None, fine: float | None = None) -> None:
        if s.box is None:
            return
        sel = s.inside & allowed[s.box]
        cv.label[s.box][sel] = lab
        if base is None:  # one level per organ and volume, shared by its parts
            base = level.setdefault(lab, ORGAN_HU[lab] + cv.jit(6))
        f, c = _TEXTURE_HU[lab] if fine is None else (fine, 0.0)
        cv.fill(sel, base, fine=f, coarse=c, box=s.box)

    _liver(cv, paint, below)
    paint(1, _ellipsoid(cv.grid, rng, (-82.0, -40.0, 55.0 + 0.6 * cv.regions["apex_shift"]), (25.0, 50.0, 45.0),
                        yaw=-35.0, deform=0.16, jitter=8.0, size=rng.uniform(0.8, 1.25)), below)
    _stomach(cv, paint, below)
    _kidney(cv, paint, below, 2, (72.0, -42.0, -15.0), -25.0)
    _kidney(cv, paint, below, 3, (-72.0, -42.0, -8.0), 25.0)
    paint(11, _tube(cv.grid, rng, [(-78.0, -15.0, 35.0), (-30.0, 12.0, 22.0), (20.0, 10.0, 8.0), (30.0, 15.0, -8.0)],
                    [9.0, 11.0, 15.0, 14.0], deform=0.2, jitter=6.0), below)
    pancreas = cv.label == 11
    cv.hu[pancreas & (cv.tex["fine"] > 1.35)] -= rng.uniform(25.0, 45.0)  # fatty lobulation
    paint(4, _ellipsoid(cv.grid, rng, (58.0, 50.0, 5.0 + cv.regions["apex_shift"]), (16.0, 18.0, 30.0), yaw=15.0,
                        deform=0.1, jitter=8.0, size=rng.uniform(0.8, 1.2)), below)
    paint(10, _tube(cv.grid, rng, [(-72.0, -28.0, 38.0), (-25.0, -4.0, 24.0), (12.0, -4.0, 22.0), (45.0, 8.0, 48.0)],
                    [5.0, 6.0, 7.5, 7.0], deform=0.1, jitter=3.0), below)
    paint(9, _tube(cv.grid, rng, [(24.0, -18.0, -160.0), (24.0, -14.0, 40.0), (30.0, -8.0, 110.0)], [11.0, 12.0, 13.0],
                   deform=0.08, jitter=3.0), organ_ok)
    paint(8, _tube(cv.grid, rng, [(-16.0, -22.0, -160.0), (-15.0, -22.0, 60.0), (-12.0, -26.0, 220.0)],
                   [10.0, 11.0, 12.0], deform=0.05, jitter=3.0), organ_ok)
    paint(5, _tube(cv.grid, rng, [(2.0, 2.0, 230.0), (-10.0, 0.0, 112.0), (-35.0, 16.0, 92.0)], [8.0, 8.0, 9.0],
                   deform=0.1, jitter=3.0), organ_ok)
    paint(12, _ellipsoid(cv.grid, rng, (42.0, -28.0, 48.0), (5.0, 14.0, 18.0), yaw=-30.0, deform=0.1, jitter=4.0,
                         vary=0.12), below)
    paint(13, _ellipsoid(cv.grid, rng, (-44.0, -28.0, 42.0), (5.0, 14.0, 18.0), yaw=30.0, deform=0.1, jitter=4.0,
                         vary=0.12), below)


# Texture amplitudes (HU per unit of the fine ~6 mm and the coarse ~16 mm field) of each organ.
_TEXTURE_HU: Mapping[int, tuple[float, float]] = MappingProxyType({
    1: (4.0, 4.0), 2: (5.0, 5.0), 3: (5.0, 5.0), 4: (2.0, 2.0), 5: (4.0, 3.0), 6: (4.0, 7.0), 7: (8.0, 4.0),
    8: (3.0, 2.0), 9: (3.0, 2.0), 10: (3.0, 2.0), 11: (8.0, 4.0), 12: (4.0, 3.0), 13: (4.0, 3.0)})


def _finish(cv: _Canvas) -> np.ndarray:
    """Partial volume (blur with the scanner's point-spread function) and correlated noise; int16 HU."""
    rng, shape = cv.rng, cv.grid.shape
    smooth = rng.uniform(0.5, 0.8)
    hu = ndimage.gaussian_filter(cv.hu, (smooth, smooth, smooth * 0.6))
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 0.5)
    noise *= rng.uniform(10.0, 20.0) / (noise.std() + 1e-6)
    hu += noise
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def make_phantom(
    seed: int | Sequence[int] = 0,
    *,
    inplane_voxels: tuple[int, int] = (96, 160),
    inplane_spacing: tuple[float, float] = (2.0, 3.0),
    slice_spacing: tuple[float, float] = (2.5, 5.0),
    orientation: str | None = None,
) -> Phantom:
    """Build one phantom (deterministic for ``seed``).

    Anatomy: body outline with subcutaneous fat (with stranding), abdominal wall, back and psoas
    muscles, visceral fat, colon and small-bowel loops with gas, spine, ribs and costal cartilage,
    iliac wings, lungs above the diaphragm, heart, and the 13 BTCV organs; each tissue has its
    own per-volume HU level and texture amplitude. Then blur (partial volume) and noise.

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
    grid = _geometry(rng, inplane_voxels, inplane_spacing, slice_spacing)
    if orientation is None:
        orientation = ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))]
    cv = _Canvas(rng, grid)
    _body(cv)
    cav3 = cv.regions["cav3"]
    pre_bone = cav3 & ~cv.regions["paraspinal"]
    _bowel(cv, pre_bone & ~cv.regions["psoas"])
    bone = _spine(cv) | _pelvis(cv)
    above, ribs = _thorax(cv, bone)
    organ_ok = pre_bone & ~bone & ~ribs
    below = organ_ok & ~above
    _organs(cv, below, organ_ok)

    # An organ too small for a coarse grid still gets its nearest voxel, so every label exists.
    present = np.bincount(cv.label.ravel(), minlength=14)
    for lab in range(1, 14):
        if present[lab] == 0:
            logger.debug("label %d empty at this resolution; marking one voxel", lab)
            _mark_one(cv.label, cv.hu, lab, organ_ok, grid, ORGAN_HU[lab])
    image = _finish(cv)

    affine = np.eye(4)
    affine[:3, :3] = np.diag(grid.spacing)
    affine[:3, 3] = grid.origin + rng.uniform(-200.0, 200.0, 3)  # scanner table position
    info = {"shape": list(grid.shape), "spacing": [float(s) for s in grid.spacing], "orientation": orientation,
            "scale": [float(s) for s in grid.scale]}
    return Phantom(image=image, label=cv.label, affine=affine, orientation=orientation, info=info)

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


def organ_lookup(organs: Sequence[int] | None) -> np.ndarray:
    """uint8 table mapping BTCV ids 0..13 to the label values written when only ``organs`` are labelled:
    ``organs[k]`` becomes k + 1, every other organ 0 (it stays in the image, unlabelled)."""
    if organs is None:
        return np.arange(14, dtype=np.uint8)
    ids = [int(o) for o in organs]
    bad = [o for o in ids if o not in BTCV_LABELS or o == 0]
    if bad or len(set(ids)) != len(ids) or not ids:
        raise ValueError(f"organs must be distinct BTCV ids in 1..13 ({dict(BTCV_LABELS)}), got {list(organs)}")
    table = np.zeros(14, dtype=np.uint8)
    table[ids] = np.arange(1, len(ids) + 1, dtype=np.uint8)
    return table


def _label_names(organs: Sequence[int] | None) -> dict[str, str]:
    """dataset.json "labels" for the organs written (all 13 BTCV ids when None)."""
    if organs is None:
        return {str(k): v for k, v in BTCV_LABELS.items()}
    return {"0": "background", **{str(k + 1): BTCV_LABELS[int(o)] for k, o in enumerate(organs)}}


def _write_case(args: tuple) -> dict:
    out, name, seed_seq, labeled, kwargs, organs = args
    ph = make_phantom(seed_seq, **kwargs)
    with open(os.path.join(out, "imagesTr", name), "wb") as f:
        f.write(_to_nifti_bytes(ph.image, ph.affine, ph.orientation, np.int16))
    if labeled:
        label = organ_lookup(organs)[ph.label]
        with open(os.path.join(out, "labelsTr", name), "wb") as f:
            f.write(_to_nifti_bytes(label, ph.affine, ph.orientation, np.uint8))
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
    organs: Sequence[int] | None = None,
) -> dict:
    """Write ``num`` phantoms as a Medical Segmentation Decathlon style folder.

    Layout: ``out/imagesTr/<prefix>_NNN.nii.gz`` (int16 HU), ``out/labelsTr/<prefix>_NNN.nii.gz``
    (uint8, BTCV ids; absent with ``unlabeled``) and ``out/dataset.json``. Volume i uses the seed
    sequence (seed, i), so a volume does not depend on ``num``. Orientations cycle through
    ``orientations`` (default ``ORIENTATIONS``: RAS, LPS, flips) from a seed-dependent start.

    ``organs`` (BTCV ids, e.g. ``(6, 1, 2, 3)``) labels only those organs, numbered 1.. in the given
    order; the others stay in the images as unlabelled anatomy (None: all 13, with their BTCV ids).

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
    organ_lookup(organs)  # validates before any file is written
    jobs = [(out, f"{prefix}_{i:03d}.nii.gz", [seed, i], not unlabeled,
             {**kw, "orientation": orients[(start + i) % len(orients)].upper()}, organs) for i in range(num)]
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
        "labels": {"0": "background"} if unlabeled else _label_names(organs),
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
