"""Preprocessing into cache space and its exact geometric inverse.

Forward (``preprocess_image`` / ``preprocess_label``), for every case:

1. reorient to RAS (a pure axis permutation / flip, nibabel ``io_orientation``);
2. resample to ``params.spacing`` keeping the first voxel centre fixed (image trilinear, labels nearest with
   halfway ties split evenly, so both sit on the same voxel centres);
3. clip intensities to ``[hu_min, hu_max]`` and scale to ``[0, 1]`` (image only);
4. crop to the body's bounding box (resampled HU > ``hu_min``) plus ``crop_margin`` voxels;
5. pad with zeros (both sides) to at least ``min_size`` per axis, with a warning naming the file.

The meta dict records each step's grid so ``restore_to_original`` can undo them in reverse order: unpad,
uncrop (zeros outside), resample to the RAS grid of the original shape, reorient back. For label maps the
round trip is exact whenever the resampling factor original->cache spacing is 1 or an upsampling by an
integer factor (e.g. 3 mm -> 1.5 mm); a downsampling necessarily loses detail finer than the cache grid.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import nibabel as nib
import numpy as np
from nibabel import orientations as nio
from scipy import ndimage

from mambamim.atomic import atomic_write
from mambamim.data.errors import DataError
from mambamim.data.io import gzip_nifti, read_image, read_label

logger = logging.getLogger(__name__)

META_VERSION = 1
_AFFINE_ATOL_DIR = 1e-3  # mm, on the direction * spacing columns
_AFFINE_ATOL_ORIGIN = 1e-2  # mm
_TIE_ATOL = 1e-6  # input voxels: a nearest-neighbour sample this close to halfway is a tie (float noise)


def _triple(value: Any, name: str, kind: type) -> tuple:
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        value = (value,) * 3
    try:
        out = tuple(kind(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a number or three numbers, got {value!r}") from exc
    if len(out) == 1:
        out = out * 3
    if len(out) != 3:
        raise ValueError(f"{name} must have 1 or 3 values, got {len(out)}")
    return out


@dataclass
class PreprocessParams:
    """Preprocessing settings; ``to_dict``/``from_dict`` let caches and checkpoints carry them.

    spacing: target voxel size in mm (x, y, z) of the RAS grid; hu_min / hu_max: intensity window mapped
    to [0, 1]; crop_foreground: crop to the body (voxels above hu_min) plus crop_margin voxels;
    min_size: pad each axis to at least this many voxels.
    """

    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    hu_min: float = -175.0
    hu_max: float = 250.0
    crop_foreground: bool = True
    min_size: tuple[int, int, int] = (96, 96, 96)
    crop_margin: int = 4

    def __post_init__(self) -> None:
        self.spacing = _triple(self.spacing, "spacing", float)
        self.min_size = _triple(self.min_size, "min_size", int)
        if any(not np.isfinite(s) or s <= 0 for s in self.spacing):
            raise ValueError(f"spacing must be positive, got {self.spacing}")
        if any(s < 0 for s in self.min_size):
            raise ValueError(f"min_size must be >= 0, got {self.min_size}")
        self.hu_min, self.hu_max = float(self.hu_min), float(self.hu_max)
        if not (np.isfinite(self.hu_min) and np.isfinite(self.hu_max)) or self.hu_max <= self.hu_min:
            raise ValueError(f"need finite hu_min < hu_max, got {self.hu_min}, {self.hu_max}")
        self.crop_foreground = bool(self.crop_foreground)
        self.crop_margin = int(self.crop_margin)
        if self.crop_margin < 0:
            raise ValueError(f"crop_margin must be >= 0, got {self.crop_margin}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spacing"], d["min_size"] = list(self.spacing), list(self.min_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "PreprocessParams":
        """Build from ``to_dict`` output; unknown keys are ignored (logged), missing ones take defaults."""
        d = dict(d or {})
        known = set(cls.__dataclass_fields__)
        extra = sorted(set(d) - known)
        if extra:
            logger.debug("PreprocessParams.from_dict: ignoring unknown keys %s", extra)
        return cls(**{k: v for k, v in d.items() if k in known})


# ----------------------------------------------------------------------------------------------------------
# Geometry helpers


def _spacing_of(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def _lists(a: np.ndarray) -> list:
    return np.asarray(a, dtype=np.float64).tolist()


def affines_match(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two voxel->world affines agree within tolerance (direction*spacing 1e-3, origin 1e-2 mm)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return bool(np.allclose(a[:3, :3], b[:3, :3], atol=_AFFINE_ATOL_DIR, rtol=0)
                and np.allclose(a[:3, 3], b[:3, 3], atol=_AFFINE_ATOL_ORIGIN, rtol=0))


def _reorient(vol: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """Apply a nibabel orientation transform to the last three axes of ``vol`` (..., X, Y, Z).

    Returns a view (flips and transposes): a copy into C order here cost 1.1 s for a 512x512x200 CT, which
    NIfTI stores X-fastest; the resampling passes and the final crop write C-ordered arrays anyway."""
    if vol.ndim == 3:
        return nio.apply_orientation(vol, transform)
    moved = np.moveaxis(vol, 0, -1)  # (X, Y, Z, C): apply_orientation acts on the leading axes
    return np.moveaxis(nio.apply_orientation(moved, transform), -1, 0)


def _resample3d(vol: np.ndarray, out_to_in: np.ndarray, out_shape: Sequence[int], order: int) -> np.ndarray:
    """Sample ``vol`` (X, Y, Z) on a grid whose voxel index v maps to input index ``out_to_in @ [v, 1]``."""
    m = np.asarray(out_to_in, dtype=np.float64)
    lin, off = m[:3, :3], m[:3, 3]
    matrix = np.diag(lin) if np.allclose(lin, np.diag(np.diag(lin)), atol=1e-12) else lin
    return ndimage.affine_transform(vol, matrix, offset=off, output_shape=tuple(int(s) for s in out_shape),
                                    order=order, mode="nearest", prefilter=False)


def _nearest_axis(vol: np.ndarray, axis: int, c: np.ndarray) -> np.ndarray:
    """Nearest neighbour along ``axis`` at input coordinates ``c`` (already clipped to the volume).

    A sample halfway between two voxels (within ``_TIE_ATOL``) is a tie: the true boundary runs through it.
    Rounding every tie up (``floor(c + 0.5)``) moved every structure by half an output voxel on each axis
    upsampled by 2 (3 mm -> 1.5 mm: -0.75 mm), off the trilinear image, which splits a tie evenly. Here a
    row along ``axis`` sends all its ties to one side, alternating in a checkerboard over the other axes:
    each row keeps its length (so volumes are kept) and half the rows go each way, so a structure's
    centroid stays put whatever its neighbours (a box upsampled by 2 keeps it exactly). The checkerboard
    ignores the index along ``axis``: one that used it correlated with the previous pass's and ate tie layers.
    """
    i0 = np.floor(c).astype(np.intp)
    i1 = np.minimum(i0 + 1, vol.shape[axis] - 1)
    frac = c - i0
    out = np.take(vol, np.where(frac < 0.5, i0, i1), axis=axis)
    t = np.flatnonzero(np.abs(frac - 0.5) <= _TIE_ATOL)
    if t.size:
        odd = _row_parity(vol.shape, axis)
        where = (slice(None),) * axis + (t,)
        out[where] = np.where(odd, np.take(vol, i1[t], axis=axis), np.take(vol, i0[t], axis=axis))
    return out


def _row_parity(shape: Sequence[int], axis: int) -> np.ndarray:
    """Bool checkerboard over the axes other than ``axis`` (length 1 there): odd index sum."""
    total = np.zeros([1] * len(shape), dtype=np.intp)
    for j, n in enumerate(shape):
        if j != axis:
            total = total + np.arange(n).reshape([-1 if k == j else 1 for k in range(len(shape))])
    return (total & 1).astype(bool)


def _resample_axis(vol: np.ndarray, axis: int, scale: float, offset: float, n_out: int, order: int,
                   threads: int = 1) -> np.ndarray:
    """1-D resampling along ``axis``: output index i samples input coordinate ``i * scale + offset``
    (edge values beyond the ends; order 0 nearest, ties split by ``_nearest_axis``; order 1 linear). Both
    orders use this one coordinate, so labels and images land on the same voxel centres. Linear passes run
    in ``threads`` threads over slabs of another axis (numpy releases the GIL): the same values."""
    n_in = vol.shape[axis]
    c = np.clip(np.arange(n_out, dtype=np.float64) * scale + offset, 0, n_in - 1)
    if order == 0:
        return _nearest_axis(vol, axis, c)
    i0 = np.floor(c).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    shape = [1] * vol.ndim
    shape[axis] = n_out
    w = (c - i0).astype(np.float32).reshape(shape)
    out_shape = list(vol.shape)
    out_shape[axis] = n_out
    out = np.empty(out_shape, dtype=vol.dtype)

    def lerp(slab: tuple) -> None:
        src, dst = vol[slab], out[slab]
        np.take(src, i0, axis=axis, out=dst, mode="clip")  # indices are in range: "clip" avoids a buffer
        a1 = np.take(src, i1, axis=axis, mode="clip")
        a1 -= dst
        a1 *= w
        dst += a1

    _for_each_slab(lerp, out_shape, axis, threads)
    return out


def _for_each_slab(fn: Any, shape: Sequence[int], skip: int, threads: int) -> None:
    """Call ``fn(index)`` for slabs that tile an array of ``shape`` along its slowest axis other than ``skip``
    with at least ``2 * threads`` planes (the whole array at once when there is none, or ``threads`` is 1),
    in ``threads`` threads."""
    split = next((a for a in range(len(shape)) if a != skip and shape[a] >= 2 * threads), None)
    if threads <= 1 or split is None:
        fn((Ellipsis,))
        return
    from concurrent.futures import ThreadPoolExecutor

    bounds = np.linspace(0, shape[split], threads + 1).round().astype(int)
    slabs = [(slice(None),) * split + (slice(a, b),) for a, b in zip(bounds[:-1], bounds[1:])]
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mambamim-resample") as pool:
        list(pool.map(fn, slabs))  # list(): re-raises a slab's exception here


def _default_threads() -> int:
    """Threads for one case's resampling: the CPUs this process may use, at most 8 (a cap, not a measured
    optimum: the passes are memory-bound, and a host's other cores have the network to feed)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def _resample(vol: np.ndarray, out_to_in: np.ndarray, out_shape: Sequence[int], order: int,
              threads: int = 1) -> np.ndarray:
    """Resample the last three axes of ``vol`` ((X, Y, Z) or (C, X, Y, Z)) onto ``out_shape``.

    An axis-aligned ``out_to_in`` (always the case for this pipeline) runs as three separable 1-D passes,
    which equal trilinear / nearest interpolation exactly and are much faster than a 3-D ``affine_transform``.
    """
    m = np.asarray(out_to_in, dtype=np.float64)
    if order == 1 and not np.issubdtype(vol.dtype, np.floating):
        vol = vol.astype(np.float32)
    if not np.allclose(m[:3, :3], np.diag(np.diag(m[:3, :3])), atol=1e-12):
        if vol.ndim == 3:
            return _resample3d(vol, m, out_shape, order)
        return np.stack([_resample3d(v, m, out_shape, order) for v in vol])
    lead = vol.ndim - 3
    scales, offsets = np.diag(m[:3, :3]), m[:3, 3]
    # Run the passes in memory order: NIfTI arrays come X-fastest, and a pass along X into a C-ordered
    # output was a strided gather (2.4 s for a 512x512x200 CT, against 0.3 s in memory order).
    mem = np.argsort([-abs(vol.strides[lead + a]) for a in range(3)], kind="stable")  # slowest axis first
    vol = vol.transpose(list(range(lead)) + [lead + int(a) for a in mem])
    where = {int(a): lead + i for i, a in enumerate(mem)}  # spatial axis -> its position in vol
    # shrink first so the later passes touch less data
    for ax in sorted(range(3), key=lambda a: -scales[a]):
        if scales[ax] == 1.0 and offsets[ax] == 0.0 and vol.shape[where[ax]] == int(out_shape[ax]):
            continue
        vol = _resample_axis(vol, where[ax], float(scales[ax]), float(offsets[ax]), int(out_shape[ax]), order,
                             threads)
    return vol.transpose(list(range(lead)) + [where[a] for a in range(3)])  # a view; callers copy if they must


def _is_identity(m: np.ndarray) -> bool:
    return bool(np.allclose(np.asarray(m), np.eye(4), atol=1e-9))


def plan_geometry(affine: np.ndarray, shape: Sequence[int], params: PreprocessParams) -> dict[str, Any]:
    """Reorientation and resampling plan for a volume of ``shape`` (X, Y, Z) with ``affine``.

    Returns the meta entries ``original``, ``ras`` and ``resampled`` (crop and padding come later, from the
    data).
    """
    affine = np.asarray(affine, dtype=np.float64)
    shape = [int(s) for s in shape]
    orig_ornt = nio.io_orientation(affine)
    to_ras = nio.ornt_transform(orig_ornt, nio.axcodes2ornt(("R", "A", "S")))
    ras_affine = affine @ nio.inv_ornt_aff(to_ras, shape)
    ras_shape = [shape[int(a)] for a in np.argsort(to_ras[:, 0])]
    # to_ras[i, 0] is the output axis of input axis i: output axis j has the length of input axis argsort[j]
    ras_spacing = _spacing_of(ras_affine)
    target = np.asarray(params.spacing, dtype=np.float64)
    scale = target / ras_spacing
    if np.allclose(scale, 1.0, atol=1e-6):
        scale = np.ones(3)
        res_shape = list(ras_shape)
    else:
        res_shape = [max(1, int(round(n * s / t))) for n, s, t in zip(ras_shape, ras_spacing, target)]
    res_affine = ras_affine @ np.diag([*scale, 1.0])
    return {
        "original": {"affine": _lists(affine), "shape": shape, "spacing": _spacing_of(affine).tolist(),
                     "axcodes": [str(c) for c in nib.aff2axcodes(affine)], "ornt": _lists(orig_ornt)},
        "ras": {"affine": _lists(ras_affine), "shape": ras_shape, "spacing": ras_spacing.tolist(),
                "ornt_transform": _lists(to_ras)},
        "resampled": {"affine": _lists(res_affine), "shape": res_shape,
                      "spacing": _spacing_of(res_affine).tolist(), "scale": scale.tolist()},
    }


def _forward_geometry(vol: np.ndarray, meta: dict, order: int, threads: int = 1) -> np.ndarray:
    """Reorient + resample ``vol`` (X, Y, Z) or (C, X, Y, Z) from the original grid to the resampled grid
    (linear passes in ``threads`` threads)."""
    to_ras = np.asarray(meta["ras"]["ornt_transform"])
    vol = _reorient(vol, to_ras)
    ras_a, res_a = np.asarray(meta["ras"]["affine"]), np.asarray(meta["resampled"]["affine"])
    out_to_in = np.linalg.solve(ras_a, res_a)  # resampled voxel -> RAS voxel
    if not _is_identity(out_to_in):
        vol = _resample(vol, out_to_in, meta["resampled"]["shape"], order, threads)
    return vol


def _crop_pad(vol: np.ndarray, meta: dict) -> np.ndarray:
    box = meta["crop"]["box"]
    sl = (Ellipsis,) + tuple(slice(a, b) for a, b in box)
    vol = vol[sl]
    pad = [tuple(p) for p in meta["pad"]]
    if any(p != (0, 0) for p in pad):
        vol = np.pad(vol, [(0, 0)] * (vol.ndim - 3) + pad, mode="constant", constant_values=0)
    return np.ascontiguousarray(vol)


def _cache_affine(res_affine: np.ndarray, box: list, pad: list) -> np.ndarray:
    shift = np.eye(4)
    shift[:3, 3] = [b[0] - p[0] for b, p in zip(box, pad)]
    return np.asarray(res_affine) @ shift


# ----------------------------------------------------------------------------------------------------------
# Public API


def _as_paths(image_paths: Sequence[str] | str | os.PathLike) -> list[str]:
    if isinstance(image_paths, (str, os.PathLike)):
        return [str(image_paths)]
    paths = [str(p) for p in image_paths]
    if not paths:
        raise ValueError("image_paths is empty")
    return paths


def preprocess_image(image_paths: Sequence[str] | str, params: PreprocessParams | None = None,
                     case_id: str | None = None, threads: int | None = None) -> tuple[np.ndarray, dict]:
    """Read and preprocess one case's image (one path per channel; NIfTI or DICOM series folder).
    ``threads`` for the resampling (None: :func:`_default_threads`; pass 1 where processes already run in
    parallel); the result does not depend on it.

    Returns ``(image, meta)``: image float32 ``(C, X, Y, Z)`` in cache space (RAS, target spacing, values
    in [0, 1], cropped and padded), meta a JSON-able dict for ``restore_to_original`` /
    ``preprocess_label``. Writes nothing. Raises DataError naming the file for any input problem.
    """
    params = params or PreprocessParams()
    paths = _as_paths(image_paths)
    vols, infos, ranges = [], [], []
    ref_affine = None
    for p in paths:
        vol, affine, info = read_image(p, dtype=np.float32)
        ranges.append((float(vol.min()), float(vol.max())) if vol.size else (0.0, 0.0))
        if not (np.isfinite(ranges[-1][0]) and np.isfinite(ranges[-1][1])):  # min and max carry any NaN
            raise DataError(p, f"{int((~np.isfinite(vol)).sum())} non-finite voxels (NaN/inf) in image")
        if ref_affine is None:
            ref_affine = affine
        else:
            if vol.shape != vols[0].shape:
                raise DataError(p, f"channel shape {vol.shape} differs from channel 0 {vols[0].shape} ({paths[0]})")
            if not affines_match(affine, ref_affine):
                raise DataError(p, f"channel affine differs from channel 0 ({paths[0]})")
        vols.append(vol)
        infos.append(info)
    data = vols[0][None] if len(vols) == 1 else np.stack(vols)  # (C, X, Y, Z); one channel: a view, no copy
    meta: dict[str, Any] = {"format": "mambamim-case-meta", "version": META_VERSION,
                            "case_id": case_id, "source": {"images": paths, "label": None},
                            "input_format": infos[0]["format"],
                            "input_range": [min(r[0] for r in ranges), max(r[1] for r in ranges)]}
    warnings = [{"file": f, "problem": f"not a readable DICOM file (corrupt or not DICOM): left out of the "
                                      f"series {info['path']}"}
                for info in infos for f in info.get("unreadable_files", [])]
    if infos[0]["format"] == "dicom":
        meta["dicom"] = {"series_uid": infos[0].get("series_uid"), "folder": infos[0].get("folder"),
                         "n_slices": infos[0].get("n_slices")}
    meta.update(plan_geometry(ref_affine, data.shape[1:], params))
    data = _forward_geometry(data, meta, order=1, threads=_default_threads() if threads is None else threads)
    lo, hi = params.hu_min, params.hu_max
    body = (data > lo).any(axis=0)
    res_shape = list(data.shape[1:])
    box = [[0, n] for n in res_shape]
    crop_applied = False
    if params.crop_foreground:
        if body.any():
            idx = [np.flatnonzero(body.any(axis=tuple(j for j in range(3) if j != i))) for i in range(3)]
            m = params.crop_margin
            box = [[max(0, int(ix[0]) - m), min(n, int(ix[-1]) + 1 + m)] for ix, n in zip(idx, res_shape)]
            crop_applied = box != [[0, n] for n in res_shape]
        else:
            logger.warning("%s: no voxel above hu_min=%g, foreground crop skipped", paths[0], lo)
    sizes = [b - a for a, b in box]
    pad = []
    for n, want in zip(sizes, params.min_size):
        extra = max(0, want - n)
        pad.append([extra // 2, extra - extra // 2])
    if any(p != [0, 0] for p in pad):
        msg = (f"volume {'x'.join(map(str, sizes))} (after resampling{' and cropping' if crop_applied else ''}) "
               f"is smaller than min_size {'x'.join(map(str, params.min_size))}: zero-padded")
        logger.warning("%s: %s", paths[0], msg)
        warnings.append({"file": paths[0], "problem": msg})
    meta["crop"] = {"box": box, "applied": crop_applied, "margin": params.crop_margin}
    meta["pad"] = pad
    np.clip(data, lo, hi, out=data)
    data -= lo
    data /= np.float32(hi - lo)
    data = _crop_pad(data, meta).astype(np.float32, copy=False)
    meta["cache"] = {"affine": _lists(_cache_affine(np.asarray(meta["resampled"]["affine"]), box, pad)),
                     "shape": [int(s) for s in data.shape]}
    meta["intensity"] = {"hu_min": lo, "hu_max": hi, "out_min": 0.0, "out_max": 1.0, "clip": True}
    meta["preprocessing"] = params.to_dict()
    meta["warnings"] = warnings
    return data, meta


def _direction(affine: np.ndarray) -> np.ndarray:
    return affine[:3, :3] / _spacing_of(affine)


def label_to_image_grid(label: np.ndarray, affine: np.ndarray, image_affine: np.ndarray,
                        image_shape: Sequence[int], label_path: str, image_name: str = "the image") -> np.ndarray:
    """Put a label map ``(X', Y', Z')`` onto its image's voxel grid ``image_shape`` (X, Y, Z), comparing the two
    in world space, not by axis codes.

    The label's axes are permuted / flipped to the image's array order (a LAS label of an LPS image, or one
    stored with its axes in another order, is fine when its voxels are the image's voxels); then shape,
    spacing, direction and origin must agree within ``affines_match``'s tolerance. Returns the reordered
    label ``(X, Y, Z)``; raises DataError naming ``label_path`` and what differs.
    """
    affine = np.asarray(affine, dtype=np.float64)
    image_affine = np.asarray(image_affine, dtype=np.float64)
    image_shape = [int(n) for n in image_shape]
    if sorted(label.shape) != sorted(image_shape):
        raise DataError(label_path, f"label shape {list(label.shape)} differs from image shape {image_shape} "
                                    f"({image_name})")
    t = nio.ornt_transform(nio.io_orientation(affine), nio.io_orientation(image_affine))
    if not np.array_equal(t, [[0, 1], [1, 1], [2, 1]]):
        moved = nio.apply_orientation(label, t)
        affine = affine @ nio.inv_ornt_aff(t, label.shape)
        label = np.ascontiguousarray(moved)
    if list(label.shape) != image_shape:
        raise DataError(label_path, f"label shape {list(label.shape)} (in the image's axis order) differs from "
                                    f"image shape {image_shape} ({image_name})")
    if affines_match(affine, image_affine):
        return label
    what = []
    ls, is_ = _spacing_of(affine), _spacing_of(image_affine)
    if not np.allclose(ls, is_, atol=_AFFINE_ATOL_DIR, rtol=0):
        what.append(f"spacing {'x'.join(f'{v:g}' for v in ls)} mm vs the image's {'x'.join(f'{v:g}' for v in is_)}")
    angle = np.degrees(np.arccos(np.clip((_direction(affine) * _direction(image_affine)).sum(0), -1, 1))).max()
    if angle > 0.01:
        what.append(f"axis directions differ by up to {angle:.2f} degrees")
    shift = float(np.linalg.norm(affine[:3, 3] - image_affine[:3, 3]))
    if shift > _AFFINE_ATOL_ORIGIN:
        what.append(f"origin {shift:.3g} mm away from the image's")
    if not what:
        what.append(f"affines differ by up to {float(np.abs(affine - image_affine).max()):.3g}")
    raise DataError(label_path, f"label is not on the image's voxel grid ({'; '.join(what)}) ({image_name}); "
                                "a label map must cover exactly the image's voxels")


def preprocess_label(label_path: str, meta: dict, declared: dict[str, str] | None = None) -> np.ndarray:
    """Read a label map and bring it to cache space with the image's ``meta`` (nearest neighbour).

    Checks it against the image in world space (``label_to_image_grid``: reordered to the image's axis
    order, then same shape, spacing, direction and origin) and, when ``declared`` (id string -> name) is
    given, that every value is a declared class. Returns uint8 ``(X, Y, Z)`` (uint16 above 255).
    Records ``source.label`` and ``label_values`` in ``meta``.
    """
    label, affine, _ = read_label(label_path)
    orig = meta["original"]
    label = label_to_image_grid(label, affine, np.asarray(orig["affine"]), orig["shape"], str(label_path),
                                meta["source"]["images"][0])
    values = np.unique(label)
    if declared is not None:
        allowed = {int(k) for k in declared}
        extra = [int(v) for v in values if int(v) not in allowed]
        if extra:
            raise DataError(label_path, f"label values {extra[:10]} are not declared classes "
                                        f"(declared {min(allowed)}..{max(allowed)})")
    top = int(values.max()) if values.size else 0
    if top > np.iinfo(np.uint16).max:
        raise DataError(label_path, f"label value {top} exceeds 65535")
    declared_top = max((int(k) for k in declared), default=0) if declared else 0
    dtype = np.uint8 if max(top, declared_top) <= 255 else np.uint16
    small = label.astype(dtype)
    out = _forward_geometry(small, meta, order=0)
    out = _crop_pad(out, meta)
    meta["source"]["label"] = str(label_path)
    meta["label_values"] = [int(v) for v in values]
    return out


def restore_to_original(array: np.ndarray, meta: dict, is_label: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Map an array from cache space back to the original image grid.

    ``array``: a label map ``(X, Y, Z)`` (is_label=True, nearest neighbour) or a float map ``(X, Y, Z)`` /
    ``(K, X, Y, Z)`` (is_label=False, trilinear) with the cache shape of ``meta``. Undoes padding and crop
    (zeros outside the crop), resamples to the RAS grid of the original shape and reorients back.
    Returns ``(array in the original voxel grid (X0, Y0, Z0) or (K, X0, Y0, Z0), original affine 4x4)``.
    """
    arr = np.asarray(array)
    cache_shape = list(meta["cache"]["shape"])[-3:]
    if arr.ndim not in (3, 4) or list(arr.shape[-3:]) != cache_shape:
        raise ValueError(f"array shape {arr.shape} does not match the cache shape {cache_shape} of this meta")
    if is_label and arr.ndim != 3:
        raise ValueError(f"a label map must be (X, Y, Z), got {arr.shape}; pass is_label=False for (K, X, Y, Z)")
    if not is_label and not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    # undo padding
    sl = (Ellipsis,) + tuple(slice(b, n - a) for (b, a), n in zip(meta["pad"], cache_shape))
    arr = arr[sl]
    # undo crop
    res_shape = list(meta["resampled"]["shape"])
    # A 3D map is built X-fastest, the order NIfTI stores: the passes below keep the layout and the
    # writer then copies it straight (a C-ordered 512x512x200 label map took 0.27 s to transpose).
    full = np.zeros(arr.shape[:-3] + tuple(res_shape), dtype=arr.dtype, order="F" if arr.ndim == 3 else "C")
    full[(Ellipsis,) + tuple(slice(a, b) for a, b in meta["crop"]["box"])] = arr
    # resample back to the RAS grid of the original shape
    ras_a, res_a = np.asarray(meta["ras"]["affine"]), np.asarray(meta["resampled"]["affine"])
    out_to_in = np.linalg.solve(res_a, ras_a)  # RAS voxel -> resampled voxel
    if not _is_identity(out_to_in):
        full = _resample(full, out_to_in, meta["ras"]["shape"], order=0 if is_label else 1)
    # reorient back
    orig_ornt = np.asarray(meta["original"]["ornt"])
    back = nio.ornt_transform(nio.axcodes2ornt(("R", "A", "S")), orig_ornt)
    out = _reorient(full, back)
    if list(out.shape[-3:]) != list(meta["original"]["shape"]):  # pragma: no cover - guards the algebra
        raise RuntimeError(f"restored shape {out.shape} != original {meta['original']['shape']}")
    return out, np.asarray(meta["original"]["affine"], dtype=np.float64)


def save_nifti_atomic(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> str:
    """Write ``array`` (X, Y, Z) or (X, Y, Z, K) with ``affine`` as NIfTI: temp file in the same folder,
    fsync, ``os.replace``. Returns the path."""
    path = os.fspath(path)
    arr = np.asarray(array)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    elif arr.dtype == np.int64:
        arr = arr.astype(np.int32)
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    with atomic_write(path) as handle:
        packed = gzip_nifti(img) if path.endswith(".gz") else None
        if packed is not None:
            handle.write(packed)
        else:
            nib.save(img, handle.name)  # nibabel picks .nii / .nii.gz from the temp name's suffix
    return path
