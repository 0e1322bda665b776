"""Draw docs/figures/phantoms_vs_real.png: synthetic phantoms beside the real abdomen CT.

Usage: python scripts/make_phantom_figure.py [--out docs/figures/phantoms_vs_real.png] [--seeds 0 1 2]
       [--real ../shared/data/ct_abdomen_3mm]

Each column is one volume (RAS arrays); the top row an axial slice through the kidneys, the bottom
row a coronal slice through the aorta, both in the abdominal window [-175, 250] HU with the BTCV
organ contours. Images are shown in the radiological convention (patient's right on the left).
"""

from __future__ import annotations

import argparse
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from mambamim.data.synth import make_phantom  # noqa: E402

WINDOW = (-175, 250)
# TotalSegmentator ids of the BTCV organs (see ../shared/data/README.md) -> BTCV ids
REAL_TO_BTCV = {1: 1, 2: 2, 3: 3, 4: 4, 15: 5, 5: 6, 6: 7, 52: 8, 63: 9, 64: 10, 7: 11, 8: 12, 9: 13}


def load_real(folder: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(HU image, BTCV label, spacing) of the real CT, reoriented to RAS."""
    img = nib.as_closest_canonical(nib.load(os.path.join(folder, "image.nii.gz")))
    lab = nib.as_closest_canonical(nib.load(os.path.join(folder, "label.nii.gz")))
    raw = np.asarray(lab.dataobj)
    btcv = np.zeros(raw.shape, np.uint8)
    for src, dst in REAL_TO_BTCV.items():
        btcv[raw == src] = dst
    return np.asarray(img.dataobj).astype(np.int16), btcv, np.asarray(img.header.get_zooms()[:3], float)


def slices(image: np.ndarray, label: np.ndarray) -> tuple[int, int]:
    """(axial z through the kidneys, coronal y through the aorta)."""
    kid = np.isin(label, (2, 3)).sum((0, 1))
    z = int(np.argmax(kid)) if kid.max() > 0 else image.shape[2] // 2
    aorta = np.argwhere(label == 8)
    y = int(np.median(aorta[:, 1])) if len(aorta) else image.shape[1] // 2
    return z, y


def draw(ax, plane: np.ndarray, lab: np.ndarray, aspect: float, title: str, xlabel: str, ylabel: str):
    """Show a (horizontal, vertical) RAS plane flipped to radiological view, with organ contours."""
    im = ax.imshow(plane[::-1].T, cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], origin="lower", aspect=aspect,
                   interpolation="nearest")
    if lab.any():
        ax.contour(lab[::-1].T, levels=np.arange(0.5, 14), cmap="tab20", linewidths=0.6, origin="lower")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=6)
    return im


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/figures/phantoms_vs_real.png")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--real", default=os.path.join("..", "shared", "data", "ct_abdomen_3mm"))
    args = p.parse_args()
    vols = []
    for s in args.seeds:
        ph = make_phantom(s)
        sp = np.asarray(ph.info["spacing"])
        vols.append((f"phantom seed {s} ({sp[0]:.1f}x{sp[1]:.1f}x{sp[2]:.1f} mm)", ph.image, ph.label, sp))
    if os.path.isfile(os.path.join(args.real, "image.nii.gz")):
        img, lab, sp = load_real(args.real)
        vols.append((f"real CT, TotalSegmentator sample ({sp[0]:.0f} mm)", img, lab, sp))
    fig, axes = plt.subplots(2, len(vols), figsize=(3.3 * len(vols) + 0.8, 7.0), squeeze=False)
    for col, (title, image, label, sp) in enumerate(vols):
        z, y = slices(image, label)
        im = draw(axes[0, col], image[:, :, z], label[:, :, z], sp[1] / sp[0], f"{title}\naxial z={z}",
                  "x (voxels, patient's right at left)", "y (voxels, anterior up)")
        draw(axes[1, col], image[:, y, :], label[:, y, :], sp[2] / sp[0], f"coronal y={y}",
             "x (voxels, patient's right at left)", "z (voxels, superior up)")
    fig.suptitle("Synthetic CT phantoms (mambamim.data.synth.make_phantom, default settings) beside a real "
                 f"abdomen CT; window [{WINDOW[0]}, {WINDOW[1]}] HU, BTCV organ contours", fontsize=10)
    fig.colorbar(im, ax=axes, fraction=0.015, pad=0.01, label="HU")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
