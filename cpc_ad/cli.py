"""The command line, `python -m cpc_utils COMMAND`: the demo dataset, a results summary, and
scoring new images with a trained model bundle. Only argparse is imported at the top, so
`--help` answers at once; each command imports what it needs."""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Sequence


def cli_parser() -> argparse.ArgumentParser:
    """The command line (`main` at the bottom runs it). Built before the heavy imports below,
    so that `python -m cpc_utils --help` answers at once."""
    parser = argparse.ArgumentParser(prog="python -m cpc_utils", description="Contrastive Predictive Coding (CPC-AD) for image anomaly detection.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo-data", help="write the demo dataset in the MVTec AD layout (about 16 s)",
                          description="Write the embedded demo dataset (8 categories, MVTec AD layout).")
    demo.add_argument("out", help="output folder, e.g. data/demo")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--categories", nargs="*", default=None, metavar="CATEGORY",
                      help="default: all eight (brick gravel grass tissue bottle screw capsule nut)")
    summary = sub.add_parser("summary", help="summarise a results folder: summary.md, .csv, comparison.png",
                             description="Summarise every metrics.json under a results folder (e.g. results/demo).")
    summary.add_argument("run_dir", help="a results folder, e.g. results/demo")
    score = sub.add_parser("score", help="score new images with a trained model bundle: verdicts, heatmaps, masks",
                           description="Score images with a model bundle (model.pt, written by notebook 02): "
                                       "writes OUT/scores.csv, OUT/heatmaps/*.png and OUT/masks/*.png. Exit "
                                       "status 1 when an image could not be read or got a non-finite score "
                                       "(listed in the CSV), or when the bundle's calibration is degenerate "
                                       "(its training images were all alike: every verdict means little).")
    score.add_argument("bundle", help="a model bundle, e.g. results/notebook02/brick/resnet18v2/model.pt")
    score.add_argument("inputs", nargs="+", metavar="INPUT",
                       help="an image file, a folder (searched recursively) or a glob (quote it)")
    score.add_argument("--out", required=True, help="output folder: new, empty, or an earlier score output "
                       "(whose files are replaced); never read as input")
    score.add_argument("--threshold", type=_finite_float, default=None,
                       help="image threshold (default: the bundle's, chosen on validation normals)")
    score.add_argument("--pixel-threshold", type=_finite_float, default=None, help="pixel threshold for the masks "
                       "(default: the bundle's)")
    score.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, ... (default auto)")
    score.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    return parser


def _finite_float(text: str) -> float:
    """A threshold from the command line: a NaN one would call every image normal (NaN > t is False)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> None:
    """Run one command; `python -m cpc_utils` parses its arguments before anything heavy is imported."""
    args = cli_parser().parse_args(argv)
    try:
        _run_command(args)
    except (OSError, ValueError) as e:  # the user's input or disk (a path below a file, a full disk): one line, no traceback
        said = e.strerror if isinstance(e, OSError) and e.strerror and e.filename is None else e  # no "[Errno 20]"
        raise SystemExit(f"python -m cpc_utils {args.command}: {said}") from None


def _run_command(args: argparse.Namespace) -> None:
    # imported here, not above: `--help` and a wrong argument answer before torch is imported
    from .inference import UPSAMPLE_WARNING, score_files
    from .data import list_categories
    from .demo import make_demo_dataset
    from .devices import resolve_device
    from .report import write_summary
    t0 = time.perf_counter()
    if args.command == "demo-data":
        root = make_demo_dataset(args.out, args.categories, seed=args.seed)
        print(f"demo dataset written to {root} ({', '.join(list_categories(root))}) "
              f"in {time.perf_counter() - t0:.1f} s")
    elif args.command == "summary":
        rows = write_summary(args.run_dir)
        print((Path(args.run_dir) / "summary.md").read_text())
        print(f"{len(rows)} runs summarised in {args.run_dir} (summary.md, summary.csv, comparison.png)")
    elif args.command == "score":
        resolve_device(args.device)  # a device this machine lacks: said now, not as a bundle that fails to load
        r = score_files(args.bundle, args.inputs, args.out, args.threshold, args.pixel_threshold, args.device,
                        args.batch_size)
        other = "grayscale" if r["colour"] == "colour" else "colour"
        print(f"{r['scored']} of {r['images']} images scored in {r['seconds']:.1f} s, {r['anomalous']} anomalous "
              f"at threshold {r['threshold']:.4g}" + (f", {r['resized']} resized" if r["resized"] else "")
              + (f", {r['upsampled']} enlarged over {UPSAMPLE_WARNING:g} times (see the upsampled column)"
                 if r["upsampled"] else "")
              + (f", {r['other_colour']} {other} images for a model trained on {r['colour']} ones (scores not "
                 "comparable with its threshold)" if r["other_colour"] else "")
              + f"; wrote {r['csv']}, heatmaps/ and masks/ in {args.out}")
        problems = [f"{r['failed']} of {r['images']} images could not be read"] * bool(r["failed"]) + [
            f"{r['nonfinite']} of {r['images']} images got a non-finite score"] * bool(r["nonfinite"])
        said = [f"{', '.join(problems)}; see the error column of {r['csv']}"] * bool(problems) + [
            r["calibration_note"]] * bool(r["calibration_note"])  # scored and written, but no verdict to trust
        if said:
            raise SystemExit(f"python -m cpc_utils score: {'; '.join(said)}")
