"""``mambamim predict``: segment NIfTI files, folders of them or DICOM series folders.

Each input's label map is written as ``<case>_seg.nii.gz`` in the input's own voxel grid,
orientation and affine (the exact inverse of preprocessing). A case that fails is reported with
the file it concerns and the others are still written; the exit status is non-zero only when
every case failed (or the checkpoint cannot be loaded).

An output file that already exists is never replaced silently: that case is refused (named on
stderr, the others still run, exit status 1) unless ``--overwrite`` replaces it or
``--skip-existing`` skips it (listed as skipped, exit status 0).

The command parses its arguments, calls :func:`mambamim.api.predict_folder` and prints its result.
The small argument helpers below are shared by the other evaluation subcommands.
"""

from __future__ import annotations

import argparse
import sys


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cuda, cuda:1, cpu or auto (default: auto)")
    parser.add_argument("--no-amp", dest="amp", action="store_false", help="disable bf16 autocast on CUDA")


def add_compile_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the network (channels-last on CUDA): about a minute to build at the first "
                             "case, then about 2x faster per volume on an H100; worth it for more than a few cases")


def add_window_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--roi", type=int, default=None,
                        help="sliding-window side in voxels, a multiple of 16 (default: the checkpoint's)")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1) (default 0.5)")
    parser.add_argument("--sw-batch-size", type=int, default=8,
                        help="windows per forward pass (default 8: 16%% faster than 4 on an H100, base model)")
    parser.add_argument("--tta", nargs="?", const="all", default="none", choices=["none", "axes", "all"],
                        help="flip test-time augmentation: 'axes' = identity + 3 single-axis flips, "
                             "'all' (or plain --tta) = all 8 flip combinations")


def error(command: str, message: str) -> int:
    """Print a one-line error for ``mambamim <command>`` on stderr and return exit status 2."""
    print(f"mambamim {command}: error: {message}", file=sys.stderr)
    return 2


def roi_arg(value: int | None) -> tuple[int, int, int] | None:
    if value is None:
        return None
    from mambamim.models.registry import PATCH_SIZE  # torch-free: --help stays instant

    if value < PATCH_SIZE or value % PATCH_SIZE:
        raise ValueError(f"--roi must be a positive multiple of {PATCH_SIZE}, got {value}")
    return (value,) * 3


def at_least_one(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="fine-tuning checkpoint (best.pt / last.pt) or run folder")
    parser.add_argument("--input", nargs="+", required=True,
                        help="NIfTI file(s), folder(s) of NIfTI files, or DICOM series folder(s)")
    parser.add_argument("--output", required=True, help="folder for the <case>_seg.nii.gz label maps")
    add_window_arguments(parser)
    add_device_arguments(parser)
    add_compile_argument(parser)
    parser.add_argument("--suffix", default="_seg.nii.gz", help="output name suffix (default _seg.nii.gz)")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true",
                          help="replace output files that already exist (default: refuse those cases, exit status 1)")
    existing.add_argument("--skip-existing", action="store_true",
                          help="skip inputs whose output file already exists (listed as skipped)")
    parser.add_argument("--read-ahead", type=at_least_one, default=2, metavar="N",
                        help="cases read and preprocessed at once while the network runs (default 2; each holds its "
                             "image in memory: 1 for very large volumes on a small machine)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _report(case) -> None:
    """Print one case's failure, skip or refusal on stderr as soon as it is known."""
    if case.status == "failed":
        print(f"FAILED {case.source}: {case.message}" if case.unreadable else f"FAILED {case.message}",
              file=sys.stderr)
    elif case.status == "skipped":
        print(f"skipped {case.source}: {case.output} already exists", file=sys.stderr)
    elif case.status == "refused":
        print(f"REFUSED {case.source}: {case.output} already exists (pass --overwrite to replace it or "
              f"--skip-existing to skip it)", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from mambamim.api import predict_folder

    try:
        result = predict_folder(
            args.checkpoint, args.input, args.output, device=args.device, compile=args.compile, suffix=args.suffix,
            overwrite=getattr(args, "overwrite", False), skip_existing=getattr(args, "skip_existing", False),
            progress=args.progress, on_case=_report, roi=roi_arg(args.roi), overlap=args.overlap,
            sw_batch_size=args.sw_batch_size, tta_flips=args.tta, amp=args.amp, read_ahead=args.read_ahead)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        return error("predict", str(exc))
    ok, failed, skipped, refused = result.written, result.failed, result.skipped, result.refused
    print(f"wrote {len(ok)} of {len(result.cases)} label map(s) to {args.output} in {result.seconds:.1f} s"
          + (f"; {len(skipped)} skipped (output exists)" if skipped else "")
          + (f"; {len(refused)} refused (output exists; --overwrite replaces, --skip-existing skips)"
             if refused else "")
          + (f"; {len(failed)} failed:" if failed else ""))
    for cid, msg in failed:
        print(f"  {cid}: {msg}")
    if skipped:
        print("  skipped: " + ", ".join(skipped))
    if refused:
        print("  refused: " + ", ".join(refused))
        return 1
    return 1 if failed and not ok else 0
