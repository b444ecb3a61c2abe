"""CPC-AD from parameters to a finished run, once: check -> data -> model -> train -> score ->
evaluate -> thresholds -> bundle and metrics.json. Notebook 02 calls `run_cpcad` and plots its
result; scripts/train.py (also under torchrun) calls it with the same parameters.

Model selection never looks at test/: training stops early on the calibration normals, each
class chooses its detector and reduction on its validation set (`selection.py`), the thresholds
come from the validation normals, and the test split is only reported.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from .checks import check_param, make_config
from .data import ImageSet, concat_sets, load_category, split_held_out
from .synthetic import make_validation_set
from .demo import resolve_data_root
from .patches import PatchGrid
from .encoders import count_parameters
from .devices import init_distributed, resolve_device, resolve_precision, seed_everything
from .models import CPCAD, CPCADConfig, cpcad_config
from .runs import (RESCORE_CHANGES, RunBlocked, abandon_run, begin_run, finish_run, fingerprint_diff, is_rescorable,
                   load_trained_weights, run_fingerprint)
from .training import TrainConfig, chosen_epoch, learning_check, parse_duration, train_model
from .scoring import (DETECTOR_PARTS, DETECTORS, FIXED, REDUCES, ScoreCalibration, ScoringConfig, detector_maps, prepare_scoring, raw_scores,
                      score_kinds, scoring_config)
from .selection import CRITERION, TIE_RULE, bootstrap_spread, candidate_table, choose
from .metrics import evaluate_maps, normal_threshold, per_defect_auroc, threshold_metrics
from .schema import IMAGE_LABELS_ONLY, PIXEL_MASKS, MetricsRecord
from .bundle import colour_mode, save_bundle
from .files import save_atomic


@dataclass
class RunParameters:
    """Notebook 02's parameters, with its defaults (its `parameters` cell must say the same:
    tests/test_notebooks.py checks). None means the preset's value (`cpcad_config`,
    `scoring_config`, `TrainConfig`). Why each default is what it is: results/study/README.md."""
    data_root: str = ""             # empty: $MVTEC_ROOT, Kaggle input, data/mvtec_ad, else the demo data
    category: str = "brick"
    encoder: str = "resnet18v2"
    preset: str = "fast"            # fast: the study's defaults; paper: de Haan & Loewe as published
    epochs: int = 40
    image_size: int = 128
    patch_size: int = 16
    stride: int = 8
    subimage_size: int | None = None
    subimage_stride: int | None = None
    width: int = 16
    stem: str | None = None
    norm: str | None = None
    pred_steps: int | None = None
    target_offset: int | None = None
    num_negatives: int | None = None
    negatives: str | None = None
    defect_negatives: str | None = None
    defect_head: bool | None = None
    test_negatives: int | None = None
    similarity: str | None = None
    temperature: float | None = None
    shared_encoder: bool | None = None
    detector: str | None = None
    reduce: str | None = None
    candidates: list[str] | None = None
    dense_scoring: bool | None = None
    batch_size: int = 8
    lr: float | None = None
    patience: int = 40
    val_fraction: float = 0.2
    num_heatmaps: int = 2
    target_fpr: float = 0.01
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    time_budget: str | float | None = None
    resume: bool = False
    output_dir: str = ""


MODEL_PARAMETERS = ("encoder", "width", "stem", "norm", "pred_steps", "target_offset", "num_negatives", "negatives",
                    "defect_negatives", "defect_head", "similarity", "temperature", "shared_encoder")
SCORING_PARAMETERS = ("detector", "reduce", "candidates", "test_negatives", "dense_scoring")  # ScoringConfig's, per run
PIXELS_WON = "raw pixels won on this class's validation set: here the learned features did not help"


@dataclass
class RunPlan:
    """What the parameters decide before any data is read: configs, device and output folder."""
    parameters: dict
    grid: PatchGrid
    model: CPCADConfig
    scoring: ScoringConfig
    train: TrainConfig
    device: torch.device
    output: Path                    # the run's folder; a staging folder beside it until the run finishes


@dataclass
class RunData:
    """The category's images: train (fits the model), calib (early stopping and the score
    calibration), normals (held out), val (normals + synthetic defects), test (only reported).

    val is two folds, each held-out half with its synthetic anomalies: the validation normals'
    (scored with the calibration fitted on the calibration normals), then the calibration
    normals' (scored with one fitted on the validation normals): twice the normals for choosing
    and for the threshold, without training on fewer images. val_folds: their sizes."""
    root: Path
    train: ImageSet
    calib: ImageSet
    normals: ImageSet
    val: ImageSet
    test: ImageSet
    val_folds: tuple[int, int] = (0, 0)


@dataclass
class Evaluated:
    """One method's maps and what `evaluate_maps` made of them, on test or validation images."""
    maps: torch.Tensor              # (N, n_sub, G, G) on the score grid
    metrics: dict
    scores: dict                    # {reduce: (N,)}
    pixel_maps: torch.Tensor        # (N, 1, H, W)


@dataclass
class CPCADResult:
    """Everything a reader of a CPC-AD run may want to look at: what `run_cpcad` returns."""
    plan: RunPlan
    data: RunData
    model: CPCAD
    history: list[dict]
    scoring: dict                   # `prepare_scoring`'s bank, references, calibration, config, grid
    ours: Evaluated                 # the chosen (or forced) detector, test split, its reduction the headline
    pure: Evaluated                 # pure CPC-AD (the paper's loss map), test split
    baseline: Evaluated             # the raw-pixel baseline on the same grid, test split
    ours_val: Evaluated
    baseline_val: Evaluated
    threshold: dict                 # `normal_threshold` of the validation normals' image scores
    pixel_threshold: dict
    record: MetricsRecord           # what metrics.json holds
    output: Path                    # the finished run's folder (model.pt, metrics.json, figures)
    figures: dict                   # {name: matplotlib Figure}, each saved as output/<name>.png
    rescored_from: Path | None = None  # the finished run whose trained weights were rescored
    detectors: dict = dataclasses.field(default_factory=dict)  # {"test" | "val": {detector: Evaluated}}
    selection: dict = dataclasses.field(default_factory=dict)  # what metrics.json's `selection` holds

    @property
    def metrics(self) -> dict:
        return self.record.to_dict()


def plan_run(params: RunParameters) -> RunPlan:
    """Check every parameter (type and range, named) and build the configs; reads nothing."""
    p = dataclasses.asdict(params)
    for name, kind in (("data_root", "str"), ("category", "str"), ("output_dir", "str"), ("resume", "bool")):
        check_param(name, p[name], kind)
    check_param("val_fraction", params.val_fraction, "float", low=0, high=0.9, open_low=True)
    check_param("num_heatmaps", params.num_heatmaps, "int", low=0)
    check_param("target_fpr", params.target_fpr, "float", low=0, high=0.5, open_low=True)
    grid = PatchGrid(params.image_size, params.patch_size, params.stride, params.subimage_size, params.subimage_stride)
    model = cpcad_config(params.preset, grid, **{k: p[k] for k in MODEL_PARAMETERS})
    scoring = scoring_config(params.preset, **{k: p[k] for k in SCORING_PARAMETERS})
    train = make_config(TrainConfig, epochs=params.epochs, batch_size=params.batch_size, lr=params.lr,
                        patience=params.patience, seed=params.seed, device=params.device,
                        precision=params.precision, time_budget=parse_duration(params.time_budget))
    kaggle = Path("/kaggle/working")  # relative outputs go where Kaggle keeps files
    output = (kaggle if kaggle.is_dir() else Path()) / (params.output_dir or
                                                      f"results/notebook02/{params.category}/{params.encoder}")
    return RunPlan(p, grid, model, scoring, train, resolve_device(params.device), output)


def run_identity(plan: RunPlan) -> dict:
    """The run's parameters with every None replaced by the value it resolved to (the preset's or
    the configs' default): what its fingerprint records, so a parameter written out at its
    default value (`lr=0.0002`) is the same run as the default itself, not a new one to train."""
    resolved = {**dataclasses.asdict(plan.grid), **dataclasses.asdict(plan.model), **dataclasses.asdict(plan.scoring),
                **dataclasses.asdict(plan.train)}
    return {k: resolved.get(k) if v is None else v for k, v in plan.parameters.items()}


def cpcad_fingerprint(parameters: dict, root: str | Path, category: str) -> dict:
    """The fingerprint `run_cpcad` records for notebook 02's `parameters` (`run_identity`) on the
    data in `root` / `category`: what scripts/sweep.py compares a finished run with. Parameters
    the pipeline refuses are taken as given (their run fails, saying why)."""
    try:
        identity = run_identity(plan_run(RunParameters(**parameters)))
    except (TypeError, ValueError):
        identity = parameters
    return run_fingerprint(identity, root, category)


def pretrain_pooled(params: RunParameters, categories: Sequence[str], path: str | Path,
                    progress: bool = True) -> list[dict]:
    """Pooled pretraining (issue 30, lever 2): one CPC-AD model trained on the train splits of
    every category in `categories` together, each split as `run_cpcad` splits it with
    `params.seed` (so no class's held-out validation normals are trained on), with early
    stopping on their calibration normals. Saves its weights to `path` for `run_cpcad(...,
    init_from=path)`; returns the training history."""
    plan = plan_run(params)
    parts = [load_run_data(plan_run(dataclasses.replace(params, category=c))) for c in categories]
    train, calib = concat_sets([d.train for d in parts]), concat_sets([d.calib for d in parts])
    print(f"pooled pretraining on {', '.join(categories)}: {len(train)} train, {len(calib)} calibration images")
    seed_everything(params.seed)
    model = CPCAD(plan.model, plan.grid)
    history = train_model(model, train, calib, plan.train, progress=progress)
    save_atomic({"state_dict": model.state_dict(), "categories": list(categories),
                 "parameters": dataclasses.asdict(params), "history": history}, Path(path))
    return history


def load_init(model: CPCAD, path: Path) -> str:
    """Load `pretrain_pooled`'s weights into `model` (weights_only); returns the file's digest."""
    import hashlib
    from .runs import load_checkpoint
    state = load_checkpoint(path, remedy="pass a file written by pretrain_pooled")
    try:
        model.load_state_dict(state["state_dict"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise RunBlocked(f"init_from={path}: not weights of this model ({str(e).splitlines()[0]}); pretrain with "
                         "the same model parameters") from e
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def load_run_data(plan: RunPlan) -> RunData:
    """The category's images and the seeded held-out split (`split_held_out`, `make_validation_set`)."""
    p = plan.parameters
    root = resolve_data_root(p["data_root"])
    data = load_category(root, p["category"], plan.grid.image_size)
    train, calib, normals = split_held_out(data["train"], p["val_fraction"], p["seed"])
    folds = [make_validation_set(normals, p["seed"], native=True), make_validation_set(calib, p["seed"] + 1, native=True)]
    return RunData(root, train, calib, normals, concat_sets(folds), data["test"], (len(folds[0]), len(folds[1])))


def evaluate(maps: torch.Tensor, images: ImageSet, grid: PatchGrid, reduces: tuple[str, ...]) -> Evaluated:
    e = evaluate_maps(maps, images, grid, reduces)
    return Evaluated(maps, e["metrics"], e["scores"], e["pixel_maps"])


def run_cpcad(params: RunParameters | None = None, *, progress: bool = True,
              on_epoch: Callable[[nn.Module, int], dict] | None = None, detectors: Sequence[str] = (),
              weights_from: str | Path | None = None, untrained: bool = False, init_from: str | Path | None = None,
              **overrides) -> CPCADResult | None:
    """Train, score and evaluate CPC-AD on one category, and write the run's folder.

    Args:
        params: notebook 02's parameters (`RunParameters`); `overrides` replace fields of it.
        on_epoch: called after every epoch (`train_model`), e.g. to evaluate during training.
        detectors: more detectors (keys of DETECTORS) to evaluate on test and validation images,
            every reduction, into `result.detectors` (the study compares them all).
        weights_from: a finished run's folder whose trained weights to score instead of training
            (its training fingerprint must be this run's: only scoring may differ).
        untrained: score the network as initialised, not trained (the study's control).
        init_from: a weights file of `pretrain_pooled` to start from instead of the random
            init (pooled pretraining, then `epochs` of this class; with `untrained`, the pooled
            encoder scored as it is). Its digest joins the training fingerprint.
    Returns:
        the result (model, maps, metrics record, thresholds, what the figures need); None on the
        non-zero ranks of a torchrun job, which stop when training ends (rank 0 scores).

    A run whose output folder holds a finished run with the same training fingerprint (same
    training parameters, data and training code) is rescored from its weights, not retrained.
    """
    params = dataclasses.replace(params or RunParameters(), **overrides)
    plan = plan_run(params)
    rank, _ = init_distributed()
    seed_everything(params.seed)
    print(f"device {plan.device}, output {plan.output.resolve()}")
    g = plan.grid
    print(f"{g}\n-> {g.num_subimages ** 2} sub-image(s) x {g.grid}x{g.grid} patches per image")

    data = load_run_data(plan)
    print(f"{data.root} / {params.category}: {len(data.train)} train, {len(data.calib)} calibration, "
          f"{len(data.val)} validation (two folds: {len(data.normals) + len(data.calib)} held-out normals + synthetic), "
          f"{len(data.test)} test images")
    print("test images per defect type:",
          {d: data.test.defect_types.count(d) for d in sorted(set(data.test.defect_types))})
    if not data.test.pixel_labels:
        print(f"ground truth: {IMAGE_LABELS_ONLY}")
    if data.val.substituted:  # a kind that cannot show on an image is drawn as another there
        print(f"note: {len(data.val.substituted)} synthetic defects drawn as another kind, theirs changed no pixel "
              f"visibly: {', '.join(Path(p).name for p in data.val.substituted)}")

    model = CPCAD(plan.model, plan.grid)
    chance_loss = model.chance_loss(plan.train.batch_size)
    print(plan.model, plan.scoring, plan.train, sep="\n")
    score_grid = plan.scoring.score_grid(plan.grid)
    print(f"{count_parameters(model):,} parameters, D = {model.encoders[0].out_dim}, chance loss {chance_loss:.3f}, "
          f"maps on the {score_grid.grid}x{score_grid.grid} score grid")

    fingerprint = run_fingerprint(run_identity(plan), data.root, params.category)
    if init_from is not None:
        fingerprint["init"] = load_init(model, Path(init_from))
    staged = plan.output.parent / f".{plan.output.name}.partial"  # begin_run's staging folder
    interrupted = params.resume and any((staged / "checkpoints").rglob("last.pt"))
    rescore = None if interrupted else is_rescorable(plan.output, fingerprint)
    if weights_from is not None:
        rescore = _check_weights_from(Path(weights_from), fingerprint)
    out = begin_run(plan.output, fingerprint, params.resume)  # the staging folder
    try:
        return _run_in(out, params, plan, data, model, fingerprint, rescore, chance_loss, rank, progress=progress,
                       on_epoch=on_epoch, detectors=detectors, weights_from=weights_from, untrained=untrained)
    except BaseException as e:  # diverged, crashed, interrupted: said in run.json, and the folder unlocked
        if rank == 0:
            abandon_run(plan.output, out, e)
        raise


def _run_in(out: Path, params: RunParameters, plan: RunPlan, data: RunData, model: CPCAD, fingerprint: dict,
            rescore: list[str] | None, chance_loss: float, rank: int, *, progress: bool, on_epoch,
            detectors: Sequence[str], weights_from, untrained: bool) -> CPCADResult | None:
    """`run_cpcad` from its staging folder `out` on: train (or take the weights to rescore),
    score, evaluate, write the figures, the bundle and metrics.json, and finish the run."""
    t0 = time.perf_counter()
    source = Path(weights_from) if weights_from is not None else plan.output
    if untrained:  # the control: the same network and scoring, nothing learned
        history, train_wall_seconds = [], 0.0
        model.eval()
    elif rescore is not None:  # only scoring changed: the finished run's weights and training record, scored again
        previous = load_trained_weights(source, model, out / "checkpoints")
        history, train_wall_seconds = previous["history"], previous["train_wall_seconds"]
        print(f"rescoring the finished run in {source} ({'only ' + ', '.join(rescore) if rescore else 'nothing'} "
              f"changed): its weights and training history, not trained again")
    else:
        history = train_model(model, data.train, data.calib, plan.train, checkpoint_dir=out / "checkpoints",
                              resume=params.resume, fingerprint=fingerprint, progress=progress, on_epoch=on_epoch)
        train_wall_seconds = time.perf_counter() - t0
    if rank:
        return None  # training done: scoring, evaluation and files are rank 0's
    train_seconds = sum(h["seconds"] for h in history)  # every epoch, also those before a resume
    final = history[-1] if history else {"train_loss": None}
    if untrained:
        learning = {"status": "untrained", "message": "not trained: the network as initialised (a control)"}
    else:
        print(f"{len(history)} epochs in {train_seconds:.0f} s; final train loss {final['train_loss']:.3f}"
              + (f", validation loss {final['val_loss']:.3f}" if "val_loss" in final else "")
              + f" (chance {chance_loss:.3f})")
        learning = learning_check(history, chance_loss)
        if learning["status"] != "ok":
            warnings.warn(learning["message"])

    result = _score_and_evaluate(plan, data, model, tuple(detectors))
    score_seconds = result.pop("score_seconds")
    record = MetricsRecord(
        category=params.category, encoder=params.encoder, preset=params.preset,
        detector=result["selection"]["detector"], image_reduce=result["selection"]["reduce"],
        selection=result["selection"], fixed=result.pop("fixed").metrics, score_grid=result["ours"].maps.shape[-1],
        baseline_grid=result["baseline"].maps.shape[-1], epochs=params.epochs, epochs_trained=len(history),
        chosen_epoch=chosen_epoch(history) if history else 0, test=result["ours"].metrics, per_defect_auroc=result.pop("per_defect"),
        cpcad=result["pure"].metrics, baseline=result["baseline"].metrics,
        baseline_per_defect_auroc=result.pop("baseline_per_defect"), val=result["ours_val"].metrics,
        val_per_kind_auroc=result.pop("val_per_kind"), val_baseline=result["baseline_val"].metrics,
        ground_truth=PIXEL_MASKS if data.test.pixel_labels else IMAGE_LABELS_ONLY,
        **result.pop("at_thresholds"),
        final_train_loss=final["train_loss"], final_val_loss=final.get("val_loss"),
        best_val_loss=min((h["val_loss"] for h in history if "val_loss" in h), default=None),
        chance_loss=chance_loss, train_seconds=train_seconds, train_wall_seconds=train_wall_seconds,
        score_seconds=score_seconds, num_parameters=count_parameters(model), embedding_dim=model.encoders[0].out_dim,
        device=str(plan.device), data_root=str(data.root), learning=learning,
        calibration=result.pop("calibration_check"), fingerprint=fingerprint, history=history,
        config={"parameters": plan.parameters, "model": dataclasses.asdict(plan.model),
                "scoring": dataclasses.asdict(plan.scoring), "train": dataclasses.asdict(plan.train),
                "grid": dataclasses.asdict(plan.grid)})
    result["figures"] = _figures(params, data, history, chance_loss, result)
    for name, fig in result["figures"].items():
        fig.savefig(out / f"{name}.png", dpi=100, bbox_inches="tight")
    save_bundle(out / "model.pt", model, result["scoring"], result["threshold"], result["pixel_threshold"],
                fingerprint["data"], resolve_precision(plan.train.precision, plan.device), colour_mode(data.train.images))
    final_dir = finish_run(plan.output, out, record.to_dict())  # metrics.json last: the run is finished
    print(f"wrote {final_dir}, model.pt ({(plan.output / 'model.pt').stat().st_size / 2**20:.1f} MiB) and "
          f"{', '.join(sorted(f'{n}.png' for n in result['figures']))}")
    return CPCADResult(plan=plan, data=data, model=model, history=history, record=record, output=plan.output,
                       rescored_from=source if rescore is not None and not untrained else None, **result)


def _figures(params: RunParameters, data: RunData, history: list[dict], chance_loss: float, r: dict) -> dict:
    """The run's figures: training curves, image ROC, score histogram, and the anomaly maps of
    the best and worst detected defect images (`num_heatmaps` each; none and no "heatmaps" figure at 0)."""
    import matplotlib.pyplot as plt
    from .plots import plot_heatmaps, plot_roc, plot_score_histogram, plot_training_curves
    cfg, test = r["scoring"]["config"], data.test
    name, labels = f"{cfg.detector} ({cfg.reduce})", test.labels.numpy()
    figures = {}
    if history:  # the untrained control has none
        figures["training_curves"] = plot_training_curves(history, f"CPC-AD {params.encoder} on {params.category}")
        ax = figures["training_curves"].axes[0]
        ax.axhline(chance_loss, color="gray", ls=":", label="chance")
        ax.legend()
    figures["roc"] = plot_roc({name: (labels, r["ours"].scores[cfg.reduce]),
                               "pure CPC-AD (mean)": (labels, r["pure"].scores["mean"]),
                               f"pixel baseline ({cfg.reduce})": (labels, r["baseline"].scores[cfg.reduce])},
                              f"{params.category}: image ROC")
    scores = r["ours"].scores[cfg.reduce].numpy()
    figures["score_histogram"] = plot_score_histogram(labels, scores, f"{params.category}: {name} image scores",
                                                      threshold=r["threshold"]["value"],
                                                      defect_types=test.defect_types)
    ranked = [i for i in np.argsort(-scores) if labels[i] == 1]  # defect images, most anomalous first
    best = ranked[:params.num_heatmaps]
    worst = [i for i in ranked[-params.num_heatmaps:] if i not in best] if params.num_heatmaps else []
    titles = [f"{'best' if i in best else 'worst'} detected: {test.defect_types[i]} {Path(test.paths[i]).name}, "
              f"score {scores[i]:.3f}" for i in best + worst]
    if best + worst:  # num_heatmaps=0 draws none
        figures["heatmaps"] = plot_heatmaps(test, r["ours"].pixel_maps, best + worst, titles)
    for fig in figures.values():
        plt.close(fig)  # kept as objects for the notebook to show; not piling up in pyplot's state
    return figures


def score_detectors(model: CPCAD, scoring: dict, images: ImageSet, detectors: Sequence[str] | None = None,
                    batch_size: int = 16, device: str | torch.device = "cpu",
                    precision: str = "auto") -> dict[str, Evaluated]:
    """Every detector in `detectors` on `images`, from one scoring pass with `prepare_scoring`'s
    output (which must hold the references they read), every reduction: the study's view of
    a model, e.g. on the validation set during training."""
    raw = raw_scores(model, images.images, scoring, batch_size, device, precision=precision)
    if detectors is None:  # every detector the prepared references can score
        detectors = [d for d in DETECTORS if all(k in raw for k in DETECTOR_PARTS[d])]
    return {d: evaluate(detector_maps(raw, scoring["calibration"], d), images, scoring["grid"], REDUCES)
            for d in detectors}


def _check_weights_from(source: Path, fingerprint: dict) -> list[str]:
    """What differs between the finished run in `source` and this one: scoring only, or RunBlocked."""
    import json
    try:
        old = json.loads((source / "metrics.json").read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunBlocked(f"weights_from={source}: not a finished run ({e})") from e
    diff = [d for d in fingerprint_diff(old, fingerprint) if d not in ("parameters.data_root", "data.root")]
    # the same files (names and sizes) in another folder are the same data: a moved dataset needs no retraining
    trained = [d for d in diff if d not in RESCORE_CHANGES]
    if trained:
        raise RunBlocked(f"weights_from={source} was trained otherwise ({', '.join(trained)} differ): "
                         "its weights are not this run's")
    return diff


def _score_and_evaluate(plan: RunPlan, data: RunData, model: CPCAD, detectors: tuple[str, ...] = ()) -> dict:
    """Score test and validation images with every candidate detector (`ScoringConfig.detectors`),
    pure CPC-AD, the raw-pixel baseline and the fixed detector (FIXED), on one grid with the same
    reductions; choose the detector and reduction on validation (`selection.py`), and the
    thresholds on the validation normals. `detectors`: more to evaluate from the same scores."""
    cfg, dev, precision, bs = plan.scoring, plan.device, plan.train.precision, plan.train.batch_size
    unknown = [d for d in detectors if d not in DETECTORS]
    if unknown:
        raise ValueError(f"unknown detectors {unknown}; choose from {', '.join(DETECTORS)}")
    names = tuple(dict.fromkeys((*cfg.detectors, "cpcad", "pixel", FIXED[0], *detectors)))
    t0 = time.perf_counter()
    scoring = prepare_scoring(model, data.train.images, data.calib.images, cfg, batch_size=bs, device=dev,
                              precision=precision, kinds=score_kinds(names))
    # score as the model was trained: same precision; the same patches whichever kinds are built
    grid, test, val = scoring["grid"], data.test, data.val
    raw = raw_scores(model, test.images, scoring, bs, dev, precision=precision)
    score_seconds = time.perf_counter() - t0
    raw_val = raw_scores(model, val.images, scoring, bs, dev, precision=precision)
    refs = ", ".join(f"{k} {tuple(v.shape)}" for k, v in scoring["references"].items())
    print(f"bank {tuple(scoring['bank'].shape)}, kNN references {refs or 'none'}, raw pixels "
          f"{'of ' + str(len(data.train)) + ' train images' if scoring['pixels'] is not None else 'none'}, "
          f"test maps {tuple(raw['loss'].shape)}, scored in {score_seconds:.1f} s")
    if scoring.get("head") is not None:  # learning shown: its loss against predicting the base rate everywhere
        log = scoring["head"].fit_log
        print(f"defect head: {log['positives']:.1%} of patches defective; BCE {log['first_bce']:.3f} -> "
              f"{log['last_bce']:.3f} (the base rate alone: {log['chance_bce']:.3f})")
    calibration = scoring["calibration"].check()  # calibration normals all alike: nothing to standardise by
    if calibration["status"] != "ok":
        warnings.warn(calibration["message"])

    n_a = data.val_folds[0]  # fold A: the validation normals (first) and theirs; fold B: the calibration normals'
    fold_b_calibration = ScoreCalibration.fit({k: v[:len(data.normals)] for k, v in raw_val.items()})

    def val_maps(d: str) -> torch.Tensor:  # cross-fitted: no image is calibrated by itself
        return torch.cat([detector_maps({k: v[:n_a] for k, v in raw_val.items()}, scoring["calibration"], d),
                          detector_maps({k: v[n_a:] for k, v in raw_val.items()}, fold_b_calibration, d)])

    on_test = {d: evaluate(detector_maps(raw, scoring["calibration"], d), test, grid, REDUCES) for d in names}
    on_val = {d: evaluate(val_maps(d), val, grid, REDUCES) for d in names}
    selection = _select(cfg, on_val, on_test, val)
    detector, reduce = selection["detector"], selection["reduce"]
    scoring["config"] = dataclasses.replace(cfg, detector=detector, reduce=reduce)  # what the bundle scores with
    ours, ours_val = _headline(on_test[detector], reduce), _headline(on_val[detector], reduce)
    pure = _headline(on_test["cpcad"], "mean")
    base, base_val = _headline(on_test["pixel"], reduce), _headline(on_val["pixel"], reduce)
    fixed = _headline(on_test[FIXED[0]], FIXED[1])
    per_defect = per_defect_auroc(test.defect_types, ours.scores[reduce])
    base_per_defect = per_defect_auroc(test.defect_types, base.scores[reduce])
    val_per_kind = per_defect_auroc(val.defect_types, ours_val.scores[reduce])
    _print_evaluation(selection, ours, pure, base, ours_val, base_val, per_defect, base_per_defect, val_per_kind)

    val_normal = val.labels == 0  # the clean held-out normals of both folds; the rest carries synthetic defects
    target_fpr = plan.parameters["target_fpr"]
    threshold = normal_threshold(ours_val.scores[reduce][val_normal], target_fpr, "image scores")
    pixel_threshold = normal_threshold(ours_val.pixel_maps[val_normal], target_fpr, "pixel scores")
    at = threshold_metrics(test.labels, ours.scores[reduce], threshold["value"])
    val_at = threshold_metrics(val.labels, ours_val.scores[reduce], threshold["value"])
    pixel_at = threshold_metrics(test.masks, ours.pixel_maps, pixel_threshold["value"]) if test.pixel_labels \
        else dict.fromkeys(("precision", "recall", "fpr"))  # no ground truth: not available
    _print_thresholds(threshold, pixel_threshold, at, val_at, pixel_at, ours, target_fpr)
    at_thresholds = {
        "threshold": threshold["value"], "threshold_rule": threshold, "val_fpr_at_threshold": val_at["fpr"],
        "val_recall_at_threshold": val_at["recall"],
        **{f"test_{k}_at_threshold": at[k] for k in ("precision", "recall", "fpr")},
        "pixel_threshold": pixel_threshold["value"], "pixel_threshold_rule": pixel_threshold,
        **{f"test_pixel_{k}_at_threshold": pixel_at[k] for k in ("precision", "recall", "fpr")}}
    extra = {"test": on_test, "val": on_val}
    return {"scoring": scoring, "ours": ours, "pure": pure, "baseline": base, "ours_val": ours_val, "detectors": extra,
            "baseline_val": base_val, "fixed": fixed, "selection": selection, "threshold": threshold,
            "pixel_threshold": pixel_threshold,
            "per_defect": per_defect, "baseline_per_defect": base_per_defect, "val_per_kind": val_per_kind,
            "at_thresholds": at_thresholds, "calibration_check": calibration, "score_seconds": score_seconds}


def _headline(e: Evaluated, reduce: str) -> Evaluated:
    """`e` with `reduce`'s image AUROC and F1-max as its headline (`image_auroc`, `image_f1_max`)."""
    metrics = {**e.metrics, "image_auroc": e.metrics[f"image_auroc_{reduce}"],
               "image_f1_max": e.metrics[f"image_f1_max_{reduce}"]}
    return dataclasses.replace(e, metrics=metrics)


def _select(cfg: ScoringConfig, on_val: dict, on_test: dict, val: ImageSet) -> dict:
    """Choose the detector and reduction on validation (`selection.py`), or take the forced ones:
    metrics.json's `selection`, every candidate's validation and test numbers beside the choice."""
    rows = candidate_table({d: on_val[d].metrics for d in cfg.detectors},
                           {d: on_test[d].metrics for d in cfg.detectors}, cfg.reduces)
    spread = None
    if len(rows) > 1:
        best = max(rows, key=lambda r: r["criterion"])
        e = on_val[best["detector"]]
        spread = bootstrap_spread(val.labels, e.scores[best["reduce"]], val.masks, e.pixel_maps)
        chosen, why = choose(rows, spread)
    else:
        chosen, why = rows[0], f"fixed: detector={cfg.detector!r}, reduce={cfg.reduce!r} (nothing to choose)"
    return {"mode": "validation" if len(rows) > 1 else "fixed", "detector": chosen["detector"],
            "reduce": chosen["reduce"], "why": why, "criterion": CRITERION, "tie_rule": TIE_RULE, "spread": spread,
            "validation": {"normals": int((val.labels == 0).sum()), "anomalies": int(val.labels.sum()), "folds": 2},
            "candidates": rows}


def _print_evaluation(selection, ours, pure, base, ours_val, base_val, per_defect, base_per_defect,
                      val_per_kind) -> None:
    reduce = selection["reduce"]
    name = f"{selection['detector']} ({reduce})"
    rows = sorted(selection["candidates"], key=lambda r: -r["criterion"])
    if len(rows) > 1:
        print(f"{len(rows)} candidates on validation ({selection['validation']['normals']} normals, "
              f"{selection['validation']['anomalies']} synthetic anomalies), {CRITERION}; test only reported:")
        print(f"  {'candidate':<30}{'criterion':>10}{'val image':>10}{'val AUPRO':>10}{'test image':>11}")
        for r in rows:
            mark = " <- chosen" if (r["detector"], r["reduce"]) == (selection["detector"], reduce) else ""
            test = "n/a" if r["test_image_auroc"] is None else f"{r['test_image_auroc']:.3f}"
            print(f"  {r['detector'] + ' (' + r['reduce'] + ')':<30}{r['criterion']:>10.3f}{r['val_image_auroc']:>10.3f}"
                  f"{r['val_aupro']:>10.3f}{test:>11}{mark}")
    print(f"chosen: {name}: {selection['why']}")
    if selection["detector"].startswith("pixel") and len(rows) > 1:
        print(PIXELS_WON)
    print(f"{'':<22}{name:>26}{'pure CPC-AD':>13}{'pixels':>10}")
    f = lambda v, width: f"{'n/a' if v is None else f'{v:.3f}':>{width}}"  # noqa: E731 (n/a: no pixel ground truth)
    for key in [f"image_auroc_{r}" for r in REDUCES] + ["pixel_auroc", "aupro"]:
        print(f"{'test ' + key:<22}{f(ours.metrics[key], 26)}{f(pure.metrics[key], 13)}{f(base.metrics[key], 10)}")
    for key in (f"image_auroc_{reduce}", "pixel_auroc"):
        print(f"{'val ' + key:<22}{f(ours_val.metrics[key], 26)}{'':>13}{f(base_val.metrics[key], 10)}")
    print(f"test image AUROC ({reduce}) per defect type:")
    for d in per_defect:
        print(f"  {d:<22}{per_defect[d]:>8.3f}{base_per_defect[d]:>10.3f}")
    print("validation image AUROC per synthetic kind:", {k: round(v, 3) for k, v in val_per_kind.items()})
    verdict = "beats" if ours.metrics["image_auroc"] > base.metrics["image_auroc"] else "does not beat"
    print(f"{name} {verdict} raw pixels on test image AUROC with the {reduce} reduction "
          f"({ours.metrics['image_auroc']:.3f} vs {base.metrics['image_auroc']:.3f})")


def _print_thresholds(threshold, pixel_threshold, at, val_at, pixel_at, ours, target_fpr) -> None:
    print(f"image threshold {threshold['value']:.4g}: {val_at['fpr']:.2f} of the {threshold['n_normals']} "
          f"validation normals above it (target {target_fpr}); recall of the synthetic anomalies {val_at['recall']:.2f}")
    print(f"pixel threshold {pixel_threshold['value']:.4g}: {pixel_threshold['fpr_on_normals']:.4f} of the "
          "validation normals' pixels above it")
    for name, m in (("test images", at), ("test pixels", pixel_at)):
        m = {k: None if v is None else round(v, 3) for k, v in m.items()}
        print(f"{name} at the threshold: precision {m['precision']}, recall {m['recall']}, false-positive rate {m['fpr']}")
    print(f"test image F1-max {ours.metrics['image_f1_max']:.3f} (for reference: its threshold is chosen on the test labels)")
    if threshold["expected_fpr"] > target_fpr:
        warnings.warn(f"only {threshold['n_normals']} validation normals: the threshold is their highest score, and a "
                      f"new normal image is expected above it with probability ~{threshold['expected_fpr']:.2f}, not "
                      f"{target_fpr}; hold out more normals (val_fraction) for a lower false-positive rate")
