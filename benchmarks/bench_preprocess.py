"""Host-side cost of segmenting one real-size CT: reading and preprocessing it, mapping a label map back to
its grid and writing it (what `mambamim predict` does around the GPU's sliding window).

    python benchmarks/bench_preprocess.py [--shape 512 512 200] [--spacing 0.78 0.78 2.0] [--repeats 3] [--concurrent 1 2 3]

The CT is synthetic (an ellipse of soft tissue with noise in air, int16, gzip NIfTI, X-fastest as NIfTI
stores it); the label map is a few boxes, so it compresses like a real one. Prints the median of each stage.
To compare two trees, run it with ``PYTHONPATH=<tree>/src`` for each in the same session. ``--concurrent``
also times reading + preprocessing copies of the CT with that many in flight at once (``predict``'s
``read_ahead``): seconds per case of the whole set.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import nibabel as nib
import numpy as np

from mambamim.data.preprocess import PreprocessParams, preprocess_image, restore_to_original, save_nifti_atomic


def synthetic_ct(shape, spacing, path: str) -> None:
    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    body = (x / 0.8) ** 2 + (y / 0.6) ** 2 < 1
    vol = np.where(body[..., None], 40, -1000) + rng.normal(0, 20, shape)
    nib.save(nib.Nifti1Image(vol.astype(np.int16), np.diag([*spacing, 1.0])), path)


def stage(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 200])
    parser.add_argument("--spacing", type=float, nargs=3, default=[0.78, 0.78, 2.0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrent", type=int, nargs="*", default=[], help="cases read at once (each a table row)")
    args = parser.parse_args()
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "ct.nii.gz")
    synthetic_ct(tuple(args.shape), args.spacing, path)
    params = PreprocessParams()
    read_s, (image, meta) = stage(lambda: preprocess_image(path, params), args.repeats)
    labels = np.zeros(image.shape[1:], dtype=np.uint8)
    n = labels.shape[0]
    labels[n // 4: n // 2, n // 4: n // 2, n // 4: n // 2] = 1
    labels[n // 2: 3 * n // 4, n // 3: n // 2, n // 4: n // 3] = 2
    back_s, (restored, affine) = stage(lambda: restore_to_original(labels, meta, is_label=True), args.repeats)
    save_s, _ = stage(lambda: save_nifti_atomic(restored, affine, os.path.join(folder, "seg.nii.gz")), args.repeats)
    print(f"CT {'x'.join(map(str, args.shape))} at {args.spacing} mm -> cache {'x'.join(map(str, image.shape[1:]))} "
          f"at {params.spacing[0]} mm; {os.cpu_count()} CPUs; median of {args.repeats}")
    print("| stage | s |\n| --- | ---: |")
    for name, secs in (("read + preprocess (gzip NIfTI, reorient, resample, window, crop)", read_s),
                       ("labels back to the CT's grid", back_s), ("write the label NIfTI (gzip, atomic)", save_s),
                       ("host total", read_s + back_s + save_s)):
        print(f"| {name} | {secs:.3f} |")
    if args.concurrent:
        concurrent_reads(path, params, args.concurrent, cases=2 * max(args.concurrent))


def concurrent_reads(path: str, params: PreprocessParams, counts: list[int], cases: int) -> None:
    """Seconds per case of reading + preprocessing ``cases`` copies of ``path`` with ``n`` in flight, for each n."""
    copies = [f"{path[:-7]}_{i}.nii.gz" for i in range(cases)]
    for copy in copies:
        shutil.copyfile(path, copy)
    print(f"\n| cases read at once ({cases} cases, each its own file) | s per case |\n| --- | ---: |")
    for n in counts:
        with ThreadPoolExecutor(max_workers=n) as pool:
            t0 = time.perf_counter()
            list(pool.map(lambda p: preprocess_image(p, params), copies))
            print(f"| {n} | {(time.perf_counter() - t0) / cases:.3f} |", flush=True)


if __name__ == "__main__":
    main()
