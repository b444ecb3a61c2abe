"""The CPC-AD study: which settings detect anomalies on data nobody tuned them on.

    python scripts/study.py --settings fast patch16 patch16_refs16k dense paper --jobs 2   # as in make study
    python scripts/study.py --report                                          # tables only

Protocol (nothing is chosen on test data):
  * train/good of each category is split, per seed, into training images (80%) and held-out
    normals (20%); half of those fit the score calibration, the other half, with synthetic
    anomalies pasted in (`cu.make_validation_set`), is the *validation set* every choice is
    made on: setting, detector, image reduction, number of epochs.
  * The demo categories are split into a tuning half (`cu.DEMO_TUNING`), whose validation
    numbers make the decisions, and a confirmation half (`cu.DEMO_CONFIRMATION`), evaluated
    once per decision and never used to choose. Test metrics are recorded for both halves and
    only reported.

One run per (setting, category, seed) is notebook 02's pipeline, `cu.run_cpcad`, scoring
every detector (`cu.DETECTORS`) with every reduction (`cu.REDUCES`), on the validation set every
`--eval-every` epochs and on both sets at the end, next to the raw-pixel baseline. Each run is
written atomically to results/study/runs/<setting>/<category>/seed<k>.json, and its run folder
(model.pt, metrics.json, figures, checkpoints; git ignores it) to seed<k>/ beside it; finished
runs are skipped, so an interrupted study resumes. --report (also run at the end) writes results/study/tables.md and
runs.csv from whatever has finished.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # cpc_utils.py, when the package is not installed

BASE = dict(image_size=128, patch_size=32, stride=16, encoder="resnet18v2", width=16, batch_size=8, lr=2e-4,
            dense_scoring=False)  # maps on the training grid, as every setting before "dense" was scored
SETTINGS = {  # name: (what it tests, overrides of BASE / CPCADConfig / cpc_utils preset)
    "fast": ("the fast defaults: shared encoder, cosine at tau 0.1, k = 1 overlapping target", {}),
    "paper": ("de Haan & Loewe as published: 4 independent models, dot product, non-overlapping targets",
              {"preset": "paper"}),
    "stem_norm": ("stem conv7x7/2 -> norm -> ReLU -> maxpool (as published for ResNet v2)", {"stem": "imagenet_norm"}),
    "stem_small": ("stem conv3x3/1 -> norm -> ReLU -> maxpool/2 on 16 px patches: 8x8 stage-1 maps, not 4x4",
                   {"stem": "small", "patch_size": 16, "stride": 8}),
    "offset1": ("cosine, but targets share no pixels with the context (target_offset 1)", {"target_offset": 1}),
    "patch16": ("16 px patches at stride 8 (15x15 grid): finer maps", {"patch_size": 16, "stride": 8}),
    "width32": ("encoder width 32", {"width": 32}),
    "patch16_refs16k": ("patch16's trained models, scored with 16,384 kNN references instead of 4,096",
                        {"patch_size": 16, "stride": 8, "knn_bank": 16384, "weights_from": "patch16"}),
    "densenet": ("DenseNet encoder under the chosen setting (16 px patches, 16,384 references)",
                 {"encoder": "densenet", "patch_size": 16, "stride": 8, "knn_bank": 16384}),
    "resnet50v2": ("ResNet-50 v2 encoder under the chosen setting (16 px patches, 16,384 references)",
                   {"encoder": "resnet50v2", "patch_size": 16, "stride": 8, "knn_bank": 16384}),
    "epochs80": ("the chosen setting trained for 80 epochs instead of 40",
                 {"patch_size": 16, "stride": 8, "knn_bank": 16384, "epochs": 80}),
    "width32_p16": ("the chosen setting with encoder width 32 instead of 16",
                    {"patch_size": 16, "stride": 8, "knn_bank": 16384, "width": 32}),
    "size256": ("256 px images, 32 px patches at stride 16: the chosen grid (15x15) with twice the pixels per patch",
                {"image_size": 256, "patch_size": 32, "stride": 16, "knn_bank": 16384}),
    "dense": ("patch16's trained models, 16,384 references, maps scored at half the training stride (29x29)",
              {"patch_size": 16, "stride": 8, "knn_bank": 16384, "dense_scoring": True, "weights_from": "patch16"}),
    "retrain": ("the chosen setting (dense) trained again with today's code, with per-defect AUROC and saved weights",
                {"patch_size": 16, "stride": 8, "knn_bank": 16384, "dense_scoring": True}),
    "hardneg": ("the chosen setting trained with hard negatives: every other patch of the target's own image, "
                "none from other images", {"patch_size": 16, "stride": 8, "knn_bank": 16384, "dense_scoring": True,
                                           "negatives": "image"}),
    "untrained": ("the chosen setting's network at its random initialisation, scored the same way: what training adds",
                  {"patch_size": 16, "stride": 8, "knn_bank": 16384, "dense_scoring": True, "epochs": 0}),
}
CHOSEN = "dense"  # the setting the defaults come from (chosen on the tuning half's validation data)
GRID_KEYS = ("image_size", "patch_size", "stride")
TRAIN_KEYS = ("batch_size", "lr", "epochs")
SCORING_KEYS = ("knn_bank", "dense_scoring", "test_negatives")  # cu.ScoringConfig's; every detector is scored


def run_dir(job: dict, setting: str | None = None) -> Path:
    """The run folder `cu.run_cpcad` writes for a job (model.pt, metrics.json, figures), beside
    its study JSON: runs/<setting>/<category>/seed<k>/."""
    out = Path(job["out"])
    return out.with_suffix("") if setting is None else out.parent.parent.parent / setting / out.parent.name / out.stem


def trained_dir(job: dict) -> Path:
    """Where the run's trained model lives: its own folder, or that of the setting it takes weights from."""
    return run_dir(job, SETTINGS[job["setting"]][1].get("weights_from", job["setting"]))


def parameters(job: dict) -> tuple[dict, int]:
    """The job as notebook 02's parameters (`cu.RunParameters`), and the epochs it records
    (0: the untrained control)."""
    import cpc_utils as cu
    s = {**BASE, **SETTINGS[job["setting"]][1]}
    if s.pop("knn_bank", cu.ScoringConfig.knn_bank) != cu.ScoringConfig.knn_bank:
        raise ValueError(f"setting {job['setting']}: knn_bank other than the default is not a notebook parameter")
    s.pop("weights_from", None)
    if s.get("preset") != "paper":  # the settings compare under one detector (the paper preset forces its own)
        s = {"detector": cu.FIXED[0], "reduce": cu.FIXED[1], **s}
    epochs = s.pop("epochs", job["epochs"])
    return {**s, "category": job["category"], "data_root": job["data_root"], "seed": job["seed"],
            "epochs": max(epochs, 1), "patience": max(epochs, 1), "val_fraction": 0.2, "device": "cpu",
            "num_heatmaps": 1, "output_dir": str(run_dir(job))}, epochs


def setup(job: dict) -> tuple:
    """The job's plan (grid, configs) and data (train, calibration, validation, test), as run_cpcad reads them."""
    import cpc_utils as cu
    plan = cu.plan_run(cu.RunParameters(**parameters(job)[0]))
    return plan, cu.load_run_data(plan)


def baseline(train, targets: dict, score_grid, reduce: str) -> dict:
    """The raw-pixel baseline on the detector's own score grid, every reduction (`reduce`, the
    configured one, first: its headline keys), as `cu.run_cpcad` computes it: like for like."""
    import cpc_utils as cu
    out = {"baseline_grid": score_grid.grid}
    for name, target in targets.items():
        maps = cu.pixel_baseline(train.images, target.images, score_grid, device="cpu")
        reduces = (reduce, *(r for r in cu.REDUCES if r != reduce))
        out[f"baseline_{name}"] = cu.evaluate_maps(maps, target, score_grid, reduces)["metrics"]
    return out


def rebaseline(job: dict) -> str:
    """Recompute a finished run's raw-pixel baseline on its score grid; nothing else changes."""
    import torch
    import cpc_utils as cu
    torch.set_num_threads(job["threads"])
    out = Path(job["out"])
    result = json.loads(out.read_text())
    plan, data = setup(job)
    result.update(baseline(data.train, {"val": data.val, "test": data.test}, plan.scoring.score_grid(plan.grid),
                           plan.scoring.reduce))
    cu.save_json(result, out)
    b = result["baseline_test"]
    return (f"{job['setting']}/{job['category']}/seed{job['seed']}: baseline on the {result['baseline_grid']}x"
            f"{result['baseline_grid']} grid, test image top10 / pixel {b['image_auroc_top10']:.2f} / {b['pixel_auroc']:.2f}")


def run_one(job: dict) -> str:
    """Train and evaluate one (setting, category, seed) with `cu.run_cpcad` (notebook 02's
    pipeline), every detector with every reduction; write its JSON; return a one-line summary.

    With job["rescore"], or for a setting that takes another's weights, the trained weights
    are read back from that run's model.pt (tensors only) and only the evaluation is redone.
    """
    import contextlib
    import io
    import torch
    import cpc_utils as cu
    torch.set_num_threads(job["threads"])
    out = Path(job["out"])
    params, epochs = parameters(job)
    plan, data = setup(job)

    def on_epoch(model, epoch):  # detection on the validation set during training: how long to train
        if epoch % job["eval_every"] and epoch != epochs:
            return {}
        scoring = cu.prepare_scoring(model, data.train.images, data.calib.images, plan.scoring, device="cpu",
                                     kinds=cu.REFERENCE_KINDS)
        return {"val_detection": {d: {k: v for k, v in e.metrics.items() if k.startswith(("image_auroc_", "pixel"))}
                                  for d, e in cu.score_detectors(model, scoring, data.val).items()}}

    trained = trained_dir(job)
    reuse = bool(job.get("rescore")) or trained != run_dir(job)  # scoring-only settings reuse another's model
    if reuse and not (trained / "model.pt").is_file():
        raise FileNotFoundError(f"{trained / 'model.pt'}: the trained model this run scores is missing; "
                                f"run the setting {trained.parent.parent.name} first")
    with contextlib.redirect_stdout(io.StringIO()):  # the pipeline's report; the study prints one line per run
        r = cu.run_cpcad(progress=False, on_epoch=on_epoch, detectors=tuple(cu.DETECTORS),
                         weights_from=trained if reuse else None, untrained=epochs == 0, **params)
    per_defect = {split: {d: {red: cu.per_defect_auroc(images.defect_types, s) for red, s in e.scores.items()}
                          for d, e in r.detectors[split].items()}
                  for split, images in (("val", r.data.val), ("test", r.data.test))}
    for split, images, base in (("val", r.data.val, r.baseline_val), ("test", r.data.test, r.baseline)):
        per_defect[split]["pixel baseline"] = {red: cu.per_defect_auroc(images.defect_types, s)
                                               for red, s in base.scores.items()}
    record = r.record
    result = {"setting": job["setting"], "category": job["category"], "seed": job["seed"],
              "half": "tuning" if job["category"] in cu.DEMO_TUNING else "confirmation",
              "epochs": epochs, "train_seconds": record.train_seconds, "history": r.history,
              "chance_loss": record.chance_loss,
              "val": {d: e.metrics for d, e in r.detectors["val"].items()},
              "test": {d: e.metrics for d, e in r.detectors["test"].items()},
              "config": {k: record.config[k] for k in ("model", "scoring", "grid")}
              | {"train": record.config["train"] if epochs else None},
              "baseline_grid": record.baseline_grid, "baseline_val": r.baseline_val.metrics,
              "baseline_test": r.baseline.metrics, "per_defect": per_defect}
    cu.save_json(result, out)
    v, t, (default, reduce) = result["val"], result["test"], cu.FIXED
    val_loss = f"{r.history[-1]['val_loss']:.2f}" if r.history else "- (untrained)"
    return (f"{job['setting']}/{job['category']}/seed{job['seed']}: {record.train_seconds:.0f} s, val loss "
            f"{val_loss}; val image/pixel cpcad {v['cpcad']['image_auroc_mean']:.2f}/"
            f"{v['cpcad']['pixel_auroc']:.2f} {default} {v[default][f'image_auroc_{reduce}']:.2f}/"
            f"{v[default]['pixel_auroc']:.2f}; test cpcad {t['cpcad']['image_auroc_mean']:.2f}/"
            f"{t['cpcad']['pixel_auroc']:.2f} baseline {result['baseline_test']['image_auroc_max']:.2f}/"
            f"{result['baseline_test']['pixel_auroc']:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--data-root", default=str(ROOT / "data" / "demo"), help="default: %(default)s (written if missing)")
    parser.add_argument("--settings", nargs="+", default=["fast", "patch16", "patch16_refs16k", "dense", "paper"],
                        choices=list(SETTINGS))
    parser.add_argument("--categories", nargs="+", help="default: the demo's tuning and confirmation halves")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=10, help="validation detection every N epochs")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each")
    parser.add_argument("--out", default=str(ROOT / "results" / "study"))
    parser.add_argument("--report", action="store_true", help="only write the tables from finished runs")
    parser.add_argument("--rescore", action="store_true",
                        help="re-evaluate finished runs from their saved weights (after adding a detector)")
    parser.add_argument("--rebaseline", action="store_true",
                        help="recompute finished runs' raw-pixel baseline on their score grid (needs no weights)")
    args = parser.parse_args(argv)

    import cpc_utils as cu
    from study_report import write_report
    out = Path(args.out)
    if not args.report:
        root = cu.resolve_data_root(args.data_root, args.data_root)
        categories = args.categories or list(cu.DEMO_TUNING + cu.DEMO_CONFIRMATION)
        jobs = [dict(setting=s, category=c, seed=k, epochs=args.epochs, eval_every=args.eval_every,
                     data_root=str(root), threads=1 if args.jobs > 1 else 2,
                     out=str(out / "runs" / s / c / f"seed{k}.json"), rescore=args.rescore)
                for s in args.settings for k in args.seeds for c in categories]
        if args.rescore:
            todo = [j for j in jobs if (trained_dir(j) / "model.pt").exists()]
        elif args.rebaseline:
            todo = [j for j in jobs if Path(j["out"]).exists()]
        else:
            todo = [j for j in jobs if not Path(j["out"]).exists()]
        if args.rescore or args.rebaseline:
            print(f"study: {'rescoring' if args.rescore else 'recomputing the baseline of'} {len(todo)} of "
                  f"{len(jobs)} runs (those {'with saved weights' if args.rescore else 'finished'})", flush=True)
        else:
            print(f"study: {len(jobs)} runs ({len(jobs) - len(todo)} finished before), {args.jobs} at a time", flush=True)
        t0, failed = time.perf_counter(), 0
        from concurrent.futures import ProcessPoolExecutor, as_completed
        import multiprocessing
        derived = [] if args.rebaseline else [j for j in todo if "weights_from" in SETTINGS[j["setting"]][1]]
        work = rebaseline if args.rebaseline else run_one
        n = 0
        for phase in ([j for j in todo if j not in derived], derived):  # models first, then what rescores them
            with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = {pool.submit(work, j): j for j in phase}
                for f in as_completed(futures):
                    j, n = futures[f], n + 1
                    try:
                        line = f.result()
                    except Exception as e:  # one failing run must not lose the others
                        failed += 1
                        line = f"{j['setting']}/{j['category']}/seed{j['seed']}: FAILED {type(e).__name__}: {e}"
                    print(f"[{n}/{len(todo)} {time.perf_counter() - t0:.0f} s] {line}", flush=True)
        print(f"study finished in {time.perf_counter() - t0:.0f} s, {failed} failed", flush=True)
    print(write_report(out, (CHOSEN, *cu.FIXED)))  # the detector the settings were compared under
    return 1 if not args.report and failed else 0


if __name__ == "__main__":
    sys.exit(main())
