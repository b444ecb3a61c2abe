"""Per-class detector selection under notebook 02's defaults: what it chooses, what that gives on
test, and how well each validation design ranks the candidates as test does.

    python scripts/selection_study.py --jobs 2                 # the demo's halves, seeds as below
    python scripts/selection_study.py --report                 # tables only, from finished runs
    python scripts/selection_study.py --set defect_negatives=outlier --out results/study/levers/defect_outlier
                                                               # a training lever (issue 30), same protocol
    python scripts/selection_study.py --pretrain --epochs 10 --out results/study/levers/pooled
                                                               # pooled pretraining, then 10 epochs per class

One run per (category, seed) is `cu.run_cpcad` at notebook 02's defaults (the detector and
reduction chosen on the class's own validation set, `cu.CANDIDATES` x `cu.REDUCES`). Beside the
validation set it chose on (two folds of held-out normals, every synthetic kind drawn at the
files' own resolution), the same trained model scores every candidate on the earlier design
(one fold, `cu.LEGACY_KINDS` drawn at the working size), so the two designs' rankings of the
candidates can be compared with test's on the same models. Test numbers are only reported.
Each run is written atomically to <out>/runs/<category>/seed<k>.json (its run folder beside
it, ignored by git); finished runs are skipped, so an interrupted study resumes. `--set NAME=VALUE`
changes notebook 02's parameters (`cu.RunParameters`) for both runs, so a lever is studied through
the same code and tables: the untrained control is the same network, scored the same way
(a training-only parameter such as `defect_negatives` changes nothing in it).
`--pretrain` first trains one model per seed on every category's train split pooled
(`cu.pretrain_pooled`, <out>/pooled_seed<k>.pt) and starts each class's run from it (`--epochs`
then counts the per-class fine-tune); the pooled model scored as it is, with no fine-tune, is
recorded beside ("pooled_as_is"), and the untrained control stays the random init.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # cpc_utils.py, when the package is not installed


def _control(record) -> dict:
    """A control run's choice as the study records it: the selection (without the candidate
    table), the chosen candidate's row and its test metrics."""
    s = record.selection
    return {"selection": {k: v for k, v in s.items() if k != "candidates"},
            "chosen": next(c for c in s["candidates"] if (c["detector"], c["reduce"]) == (s["detector"], s["reduce"])),
            "test": record.test}


def run_one(job: dict) -> str:
    """Train, choose and evaluate one (category, seed); score the earlier validation design too."""
    import contextlib
    import io
    import torch
    import cpc_utils as cu
    torch.set_num_threads(job["threads"])
    out = Path(job["out"])
    init = job.get("init_from")

    def run(suffix: str, **kw):
        with contextlib.redirect_stdout(io.StringIO()):
            return cu.run_cpcad(progress=False, data_root=job["data_root"], category=job["category"], seed=job["seed"],
                                epochs=job["epochs"], device="cpu", num_heatmaps=1,
                                output_dir=str(out.with_suffix("")) + suffix, **kw, **job["overrides"])
    r = run("", init_from=init)
    u = run("_untrained", untrained=True)  # the control: the same network and protocol, untrained
    as_is = None
    if init:  # the pooled model with no fine-tune: scored the same way
        a = run("_pooled", untrained=True, init_from=init)
        as_is = {**_control(a.record), "cpcad": a.record.cpcad}
    legacy = cu.make_validation_set(r.data.normals, job["seed"], kinds=cu.LEGACY_KINDS)
    candidates = r.plan.scoring.detectors
    on_legacy = cu.score_detectors(r.model, r.scoring, legacy, candidates, device="cpu",
                                   precision=r.plan.train.precision)
    rec = r.record
    result = {"category": job["category"], "seed": job["seed"], "overrides": job["overrides"],
              "half": "tuning" if job["category"] in cu.DEMO_TUNING else "confirmation",
              "selection": rec.selection, "test": rec.test, "fixed": rec.fixed, "cpcad": rec.cpcad,
              "pixels": r.detectors["test"]["pixel"].metrics,
              "untrained": _control(u.record),
              **({"init_from": Path(init).name, "pooled_as_is": as_is} if init else {}),
              "legacy_val": {d: e.metrics for d, e in on_legacy.items()},
              "val_recall_at_threshold": rec.val_recall_at_threshold,
              "test_recall_at_threshold": rec.test_recall_at_threshold,
              "test_fpr_at_threshold": rec.test_fpr_at_threshold, "threshold_normals": rec.threshold_rule["n_normals"],
              "train_seconds": rec.train_seconds, "score_seconds": rec.score_seconds}
    cu.save_json(result, out)
    s = rec.selection
    return (f"{job['category']}/seed{job['seed']}: chose {s['detector']} ({s['reduce']}); test image "
            f"{rec.test['image_auroc']:.3f}, untrained {u.record.test['image_auroc']:.3f}, "
            f"fixed {rec.fixed['image_auroc']:.3f}, pixels (max) "
            f"{result['pixels']['image_auroc_max']:.3f}")


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr
    return float(spearmanr(a, b).statistic)


def rank_correlations(run: dict) -> tuple[float, float]:
    """Spearman correlation over the candidates (detector x reduction) between validation and
    test image AUROC: on the earlier validation design, and on the one the run chose on."""
    rows = run["selection"]["candidates"]
    test = [r["test_image_auroc"] for r in rows]
    before = [run["legacy_val"][r["detector"]][f"image_auroc_{r['reduce']}"] for r in rows]
    after = [r["val_image_auroc"] for r in rows]
    return spearman(before, test), spearman(after, test)


def overrides_said(runs: list[dict]) -> str:
    sets = {json.dumps(r.get("overrides", {}), sort_keys=True) for r in runs}
    if len(sets) > 1:
        raise ValueError(f"runs with different --set in one study folder: {sorted(sets)}; use one --out for each")
    given = json.loads(sets.pop())
    return "".join(f", `{k}={v!r}`" for k, v in given.items()) and " except " + ", ".join(
        f"`{k}={v!r}`" for k, v in given.items())


def report(out: Path) -> str:
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").rglob("seed*.json"))]
    if not runs:
        return f"no finished runs under {out / 'runs'}"
    lines = ["# Per-class detector selection: the study's tables", "",
             "Generated by `python scripts/selection_study.py --report` from the runs in `runs/`. Notebook 02 at "
             f"its defaults{overrides_said(runs)} on the demo categories; test numbers are only reported, never chosen "
             "on.", "",
             "## Test image AUROC / pixel AUROC / AUPRO, mean over the half's categories (± std over seeds)", "",
             "| half | seeds | chosen per class | same network untrained, chosen per class | fixed (`knn_stats`, top10) "
             "| raw pixels (max) | pure CPC-AD (mean) |",
             "|---|---|---|---|---|---|---|"]
    fam = {"chosen": lambda r: (r["test"]["image_auroc"], r["test"]["pixel_auroc"], r["test"]["aupro"]),
           "untrained": lambda r: (r["untrained"]["test"]["image_auroc"], r["untrained"]["test"]["pixel_auroc"],
                                   r["untrained"]["test"]["aupro"]),
           "fixed": lambda r: (r["fixed"]["image_auroc_top10"], r["fixed"]["pixel_auroc"], r["fixed"]["aupro"]),
           "pixels": lambda r: (r["pixels"]["image_auroc_max"], r["pixels"]["pixel_auroc"], r["pixels"]["aupro"]),
           "cpcad": lambda r: (r["cpcad"]["image_auroc_mean"], r["cpcad"]["pixel_auroc"], r["cpcad"]["aupro"])}
    for half in ("tuning", "confirmation"):
        sel = [r for r in runs if r["half"] == half]
        if not sel:
            continue
        seeds = sorted({r["seed"] for r in sel})
        cells = []
        for f in fam.values():
            per_seed = np.array([np.mean([f(r) for r in sel if r["seed"] == k], axis=0) for k in seeds])  # (S, 3)
            mean, std = per_seed.mean(0), per_seed.std(0)
            cells.append(f"{mean[0]:.3f} ± {std[0]:.3f} / {mean[1]:.3f} / {mean[2]:.3f}")
        lines.append(f"| {half} | {len(seeds)} x {len({r['category'] for r in sel})} cat. | " + " | ".join(cells) + " |")
    lines += ["", *validation_table(runs), "## Per category and seed", "",
              "| half | category | seed | chosen | why | test image: chosen | fixed | pixels (max) | "
              "chosen − pixels | rank corr. before | after | val recall at threshold | test recall / FPR at it |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    corr = {"tuning": [], "confirmation": []}
    for r in sorted(runs, key=lambda r: (r["half"] != "tuning", r["category"], r["seed"])):
        before, after = rank_correlations(r)
        corr[r["half"]].append((before, after))
        s, t = r["selection"], r["test"]
        short = "best" if s["why"].startswith("highest") else "fewer parts"
        lines.append(f"| {r['half']} | {r['category']} | {r['seed']} | {s['detector']} ({s['reduce']}) | {short} | "
                     f"{t['image_auroc']:.3f} | {r['fixed']['image_auroc_top10']:.3f} | "
                     f"{r['pixels']['image_auroc_max']:.3f} | {t['image_auroc'] - r['pixels']['image_auroc_max']:+.3f} | "
                     f"{before:.2f} | {after:.2f} | {r['val_recall_at_threshold']:.2f} | "
                     f"{r['test_recall_at_threshold']:.2f} / {r['test_fpr_at_threshold']:.2f} |")
    lines += ["", "## Validation-test rank correlation (Spearman over the candidates' image AUROC)", "",
              "| half | runs | before: one fold, six kinds at the working size | after: two folds, ten kinds at the "
              "files' resolution |", "|---|---|---|---|"]
    for half, v in corr.items():
        if v:
            b, a = np.array(v).T
            lines.append(f"| {half} | {len(v)} | {b.mean():.2f} (min {b.min():.2f}) | {a.mean():.2f} (min {a.min():.2f}) |")
    text = "\n".join(lines) + "\n"
    import cpc_utils as cu
    cu.save_text_ours(text, out / "tables.md")
    return text


def validation_table(runs: list[dict]) -> list[str]:
    """What a lever is judged on: each half's validation numbers (image AUROC / pixel AUROC /
    AUPRO of the class's own validation set), mean over its runs."""
    def val(r, detector, reduce):
        row = next(c for c in r["selection"]["candidates"] if c["detector"] == detector and c["reduce"] == reduce)
        return row["val_image_auroc"], row["val_pixel_auroc"], row["val_aupro"]
    fam = {"chosen": lambda r: val(r, r["selection"]["detector"], r["selection"]["reduce"]),
           "untrained, chosen": lambda r: tuple(r["untrained"]["chosen"][f"val_{k}"]  # runs before 2026-12-05: "–"
                                                for k in ("image_auroc", "pixel_auroc", "aupro"))
                                          if "chosen" in r["untrained"] else None,
           "`knn_stats` (top10)": lambda r: val(r, "knn_stats", "top10"),
           "raw pixels (max)": lambda r: val(r, "pixel", "max"),
           "pure CPC-AD (mean)": lambda r: val(r, "cpcad", "mean")}
    lines = ["## Validation image AUROC / pixel AUROC / AUPRO, mean over the half's runs (what levers are judged on)",
             "", "| half | runs | " + " | ".join(fam) + " |", "|---|---|" + "---|" * len(fam)]
    for half in ("tuning", "confirmation"):
        sel = [r for r in runs if r["half"] == half]
        if sel:
            values = [[f(r) for r in sel] for f in fam.values()]
            cells = [" / ".join(f"{m:.3f}" for m in np.mean(v, axis=0)) if None not in v else "–" for v in values]
            lines.append(f"| {half} | {len(sel)} | " + " | ".join(cells) + " |")
    return lines + [""]


def _row(r: dict, detector: str, reduce: str) -> dict:
    return next(c for c in r["selection"]["candidates"] if (c["detector"], c["reduce"]) == (detector, reduce))


def lever_report(base: Path, levers: list[Path]) -> str:
    """Each lever's study folder beside the baseline's (`base`: notebook 02's defaults) on the
    (category, seed) runs both have: validation first (what a lever is adopted on, tuning half),
    then test (reported only). Written to <levers' parent>/tables.md."""
    def load(folder):
        return {(r["category"], r["seed"]): r for r in map(json.loads, map(Path.read_text,
                                                                            sorted((folder / "runs").rglob("seed*.json"))))}
    baseline, studies = load(base), {f"`{p.name}/`": load(p) for p in levers}
    chosen = lambda r: _row(r, r["selection"]["detector"], r["selection"]["reduce"])  # noqa: E731
    val = {"criterion (chosen)": lambda r: (chosen(r)["criterion"],),
           "chosen: image / pixel / AUPRO": lambda r: tuple(chosen(r)[f"val_{k}"] for k in KEYS),
           "pure CPC-AD (mean): image / pixel / AUPRO": lambda r: tuple(_row(r, "cpcad", "mean")[f"val_{k}"] for k in KEYS)}
    test = {"chosen: image / pixel / AUPRO": lambda r: tuple(r["test"][k] for k in KEYS),
            "untrained, chosen: image / pixel / AUPRO": lambda r: tuple(r["untrained"]["test"][k] for k in KEYS),
            "raw pixels: image (max) / pixel": lambda r: (r["pixels"]["image_auroc_max"], r["pixels"]["pixel_auroc"]),
            "pure CPC-AD (mean): image / pixel / AUPRO": lambda r: tuple(_row(r, "cpcad", "mean")[f"test_{k}"]
                                                                        for k in KEYS),
            "train s (median)": lambda r: (r["train_seconds"],)}
    lines = ["# Training levers beside notebook 02's defaults", "",
             "Generated by `python scripts/selection_study.py --levers` from `../selection/runs` and each lever's "
             "`runs/`: each lever beside the defaults on the (category, seed) runs both have. Levers are adopted on "
             "the tuning half's validation numbers only; test numbers are reported, never chosen on.", ""]
    for title, table in (("Validation", val), ("Test", test)):
        lines += [f"## {title}, mean over the half's runs (train s: median)", "",
                  "| half | runs | study | " + " | ".join(table) + " |", "|---|---|---|" + "---|" * len(table)]
        for half in ("tuning", "confirmation"):
            said = None
            for name, runs in studies.items():
                keys = sorted(k for k in set(runs) & set(baseline) if runs[k]["half"] == half)
                for who, rs in (("defaults (`selection/`)", baseline), (name, runs)):
                    if not keys or (rs is baseline and keys == said):
                        continue
                    cells = [" / ".join(f"{v:.0f}" if col.startswith("train") else f"{v:.3f}" for v in
                                        (np.median if col.startswith("train") else np.mean)(
                                            [f(rs[k]) for k in keys], axis=0)) for col, f in table.items()]
                    lines.append(f"| {half} | {len(keys)} | {who} | " + " | ".join(cells) + " |")
                said = keys
        lines.append("")
    lines += ["## Per run, validation: criterion of the chosen detector / pure CPC-AD's pixel AUROC", "",
              "| half | category | seed | defaults | " + " | ".join(studies) + " |",
              "|---|---|---|---|" + "---|" * len(studies)]
    cell = lambda r: f"{chosen(r)['criterion']:.3f} / {_row(r, 'cpcad', 'mean')['val_pixel_auroc']:.3f}"  # noqa: E731
    for k in sorted(baseline, key=lambda k: (baseline[k]["half"] != "tuning", k)):
        if any(k in runs for runs in studies.values()):
            lines.append(f"| {baseline[k]['half']} | {k[0]} | {k[1]} | {cell(baseline[k])} | " + " | ".join(
                cell(runs[k]) if k in runs else "–" for runs in studies.values()) + " |")
    text = "\n".join(lines) + "\n"
    import cpc_utils as cu
    cu.save_text_ours(text, levers[0].parent / "tables.md")
    return text


KEYS = ("image_auroc", "pixel_auroc", "aupro")


def parse_overrides(given: list[str], params: type) -> dict:
    """["defect_negatives=outlier", "num_negatives=31"] -> {"defect_negatives": "outlier", "num_negatives": 31};
    a name RunParameters lacks is an error."""
    import dataclasses
    known, out = {f.name for f in dataclasses.fields(params)}, {}
    for item in given:
        name, sep, value = item.partition("=")
        if not sep or name not in known:
            raise SystemExit(f"--set {item!r}: expected NAME=VALUE with NAME one of notebook 02's parameters")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--data-root", default=str(ROOT / "data" / "demo"), help="default: %(default)s (written if missing)")
    parser.add_argument("--tuning-seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--confirmation-seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each")
    parser.add_argument("--out", default=str(ROOT / "results" / "study" / "selection"))
    parser.add_argument("--report", action="store_true", help="only write the tables from finished runs")
    parser.add_argument("--levers", action="store_true",
                        help="only write levers/tables.md beside --out: every lever's study beside the defaults' (--out)")
    parser.add_argument("--pretrain", action="store_true",
                        help="pooled pretraining per seed on every category first; --epochs then fine-tunes each class")
    parser.add_argument("--pretrain-epochs", type=int, default=40)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="overrides",
                        help="a notebook 02 parameter for the trained runs, VALUE as JSON (true, 3, \"image\")")
    args = parser.parse_args(argv)
    import cpc_utils as cu
    if args.levers:  # beside --out (default results/study/selection): its sibling levers/<lever>/
        study = Path(args.out).parent
        print(lever_report(Path(args.out), sorted(p for p in (study / "levers").iterdir() if (p / "runs").is_dir())))
        return 0
    out, failed = Path(args.out), 0
    overrides = parse_overrides(args.overrides, cu.RunParameters)
    if not args.report:
        root = cu.resolve_data_root(args.data_root, args.data_root)
        pairs = [(c, k) for c in cu.DEMO_TUNING for k in args.tuning_seeds] + \
                [(c, k) for c in cu.DEMO_CONFIRMATION for k in args.confirmation_seeds]
        jobs = [dict(category=c, seed=k, epochs=args.epochs, data_root=str(root), threads=1 if args.jobs > 1 else 2,
                     overrides=overrides, out=str(out / "runs" / c / f"seed{k}.json")) for c, k in pairs]
        todo = [j for j in jobs if not Path(j["out"]).exists()]
        if args.pretrain:  # one pooled model per seed, before the runs that start from it
            import torch
            torch.set_num_threads(2)
            for k in sorted({j["seed"] for j in todo}):
                path = out / f"pooled_seed{k}.pt"
                if not path.exists():
                    cu.pretrain_pooled(cu.RunParameters(data_root=str(root), seed=k, epochs=args.pretrain_epochs,
                                                        device="cpu", **overrides),
                                       cu.list_categories(root), path, progress=False)
                for j in todo:
                    if j["seed"] == k:
                        j["init_from"] = str(path)
        print(f"selection study: {len(jobs)} runs ({len(jobs) - len(todo)} finished before), {args.jobs} at a time",
              flush=True)
        from concurrent.futures import ProcessPoolExecutor, as_completed
        import multiprocessing
        t0 = time.perf_counter()
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(run_one, j): j for j in todo}
            for n, f in enumerate(as_completed(futures), 1):
                j = futures[f]
                try:
                    line = f.result()
                except Exception as e:  # one failing run must not lose the others
                    failed += 1
                    line = f"{j['category']}/seed{j['seed']}: FAILED {type(e).__name__}: {e}"
                print(f"[{n}/{len(todo)} {time.perf_counter() - t0:.0f} s] {line}", flush=True)
    print(report(out))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
