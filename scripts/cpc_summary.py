"""One table from notebook 01's runs: per category, CPC's same-image prediction accuracy and
the patch probes of the trained encoder, its random initialisation (each as stage statistics
and as the embedding z) and raw pixels.

    python scripts/cpc_summary.py results/notebook01            # prints markdown
    python scripts/cpc_summary.py results/notebook01 --out results/notebook01/summary.md

Reads every <root>/<category>/<encoder>/metrics.json that notebook 01 wrote; numbers are mean
± std over the run's seeds, and each half's mean row the mean of its categories' means.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # cpc_utils.py, when the package is not installed


def summary(root: Path) -> str:
    import cpc_utils as cu
    runs = sorted(root.glob("*/*/metrics.json"))
    if not runs:
        raise SystemExit(f"cpc_summary: no <category>/<encoder>/metrics.json under {root}")
    metrics = [json.loads(p.read_text()) for p in runs]
    metrics.sort(key=lambda m: (cu.half_rank(cu.demo_half(m["category"])), m["category"], m["encoder"]))
    pm = lambda values: cu.mean_pm(values, 2)  # noqa: E731
    k = len(metrics[0]["same_image_accuracy"])
    head = ["category", "half", "encoder", "seeds", "learned",
            *(f"same-image acc. k={i + 1}" for i in range(k)), "chance",
            *(f"kNN patch AUROC: {f}" for f in cu.PROBE_FEATURES), *(f"linear: {f}" for f in cu.PROBE_FEATURES),
            "kNN: trained beats random", "kNN: trained beats pixels", "linear: trained beats random"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for m in metrics:
        r = m["runs"]
        cells = [m["category"], cu.demo_half(m["category"]) or "-", m["encoder"], str(len(r)),
                 f"{sum(x['learning']['status'] == 'ok' for x in r)}/{len(r)}",
                 *(pm([x["image"]["acc_per_step"][i] for x in r]) for i in range(k)),
                 f"{m['same_image_chance_accuracy']:.3f}",
                 *(pm([x["probes"][f]["knn_auroc"] for x in r]) for f in cu.PROBE_FEATURES),
                 *(pm([x["probes"][f]["linear_auroc"] for x in r]) for f in cu.PROBE_FEATURES),
                 *(verdict(m.get(key)) for key in ("probe_trained_beats_random", "probe_trained_beats_pixel",
                                                   "linear_trained_beats_random"))]
        lines.append("| " + " | ".join(cells) + " |")
    for half in dict.fromkeys(cu.demo_half(m["category"]) for m in metrics):  # the mean of the categories' means
        sel = [m for m in metrics if cu.demo_half(m["category"]) == half]
        mean = lambda f: f"{np.mean([np.mean(f(m)) for m in sel]):.2f}"  # noqa: E731
        cells = ["**mean**", half or "-", f"{len(sel)} categories", "", "",
                 *(mean(lambda m: [x["image"]["acc_per_step"][i] for x in m["runs"]]) for i in range(k)), "",
                 *(mean(lambda m: [x["probes"][f][p] for x in m["runs"]]) for p in ("knn_auroc", "linear_auroc")
                   for f in cu.PROBE_FEATURES), "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def verdict(beats: bool | None) -> str:
    return "-" if beats is None else "yes" if beats else "**no**"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("root", type=Path, help="folder holding <category>/<encoder>/metrics.json")
    parser.add_argument("--out", type=Path, help="write the markdown here (atomically; never over a file cpc_utils did not write) instead of printing it")
    args = parser.parse_args(argv)
    text = summary(args.root)
    if args.out:
        import cpc_utils as cu
        try:  # never over a file of the user's
            cu.save_text_ours(text, args.out)
        except (OSError, ValueError) as e:
            raise SystemExit(f"cpc_summary: {e}") from None
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
