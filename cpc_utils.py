"""Contrastive Predictive Coding for image anomaly detection: the façade the notebooks import.

    import cpc_utils as cu          # every public name of the cpc_ad package, as one namespace
    python -m cpc_utils --help      # demo-data, summary, score

The code lives in the package `cpc_ad`, one concern per module, in the order the data flows:
data -> synthetic -> demo -> checks -> patches -> encoders -> devices -> corruption -> models -> runs ->
training -> scoring -> metrics -> probes -> schema -> plots -> report -> bundle -> inference ->
pipeline -> cli (docs/module.md maps them). This file re-exports their public names and nothing else.

Papers: CPC, van den Oord, Li, Vinyals 2018, arXiv:1807.03748 (and CPC v2, Henaff et al. 2019,
arXiv:1905.09272); CPC-AD, de Haan & Loewe 2021, arXiv:2107.07820.
"""
if __name__ == "__main__":  # parse first: --help and a wrong argument answer before torch is imported
    from cpc_ad.cli import cli_parser

    cli_parser().parse_args()

from cpc_ad.files import (  # noqa: F401
    save_atomic, save_json, FILES_MANIFEST, SCORE_MANIFEST, written_here, check_ours, record_ours, save_ours,
    save_text_ours, save_json_ours, remove_ours)
from cpc_ad.resources import (  # noqa: F401
    project_file)
from cpc_ad.data import (  # noqa: F401
    MVTEC_CATEGORIES, IMAGE_EXTENSIONS, KAGGLE_ROOTS, NESTED_DIR, LOCAL_ROOT, EXPECTED_LAYOUT,
    candidate_roots, list_categories, find_mvtec_root, ImageSet, read_image, LOSSY_FORMATS, FULL_MASK, read_mask,
    load_category, split_train_val, split_held_out, concat_sets)
from cpc_ad.synthetic import (  # noqa: F401
    SYNTHETIC_KINDS, LEGACY_KINDS, NATIVE_MAX_SIDE, synthetic_anomalies, make_validation_set)
from cpc_ad.demo import (  # noqa: F401
    DemoCategory, DEMO_CATEGORIES, DEMO_KIND_DEFECTS, DEMO_EDITS, DEMO_TUNING, DEMO_CONFIRMATION,
    DEMO_IMAGE_SIZE, DEMO_FOREIGN_PHOTO, demo_defects, DEMO_MANIFEST, make_demo_dataset,
    resolve_data_root)
from cpc_ad.checks import (  # noqa: F401
    check_param, ParameterError, make_config)
from cpc_ad.patches import (  # noqa: F401
    PatchGrid, to_subimages, patch_positions, extract_patches, patches_to_pixels, to_float)
from cpc_ad.encoders import (  # noqa: F401
    LayerNorm2d, NORMS, norm_layer, PreActBasicBlock, PreActBottleneck, STEMS, make_stem,
    PatchEncoder, resnet_v2, DenseLayer, densenet, ENCODERS, build_encoder, count_parameters)
from cpc_ad.devices import (  # noqa: F401
    DEVICES, resolve_device, seed_everything, PRECISIONS, resolve_precision, autocast,
    init_distributed)
from cpc_ad.corruption import (  # noqa: F401
    CORRUPTION_KINDS, AREA, CHANGED, noise_masks, corrupt, changed_patches)
from cpc_ad.models import (  # noqa: F401
    info_nce, encode_grid, REFERENCE_KINDS, CausalConv2d, PixelCNNContext, CPCConfig, CPC,
    DIRECTIONS, DEFECT_NEGATIVES, orient, unorient, CPCADConfig, cpcad_config, CPCAD)
from cpc_ad.runs import (  # noqa: F401
    RunBlocked, NOT_IDENTITY, RESUMABLE_TRAIN, RESUMABLE_CHANGES, CODE_PARTS, RESCORE_CHANGES,
    code_fingerprint, code_version, data_fingerprint, run_fingerprint, fingerprint_diff,
    acquire_lock, RUN_MARKER, LEGACY_RUN_FILES, LEGACY_RUN_FOLDERS, is_run_folder, record_run_files,
    begin_run, finish_run, abandon_run, stage_continuation, load_checkpoint, is_rescorable,
    load_trained_weights)
from cpc_ad.training import (  # noqa: F401
    TrainConfig, TimeBudgetReached, parse_duration, validation_loss, NEGATIVES_SEED_OFFSET,
    train_model, learning_check, chosen_epoch)
from cpc_ad.scoring import (  # noqa: F401
    ScoringConfig, scoring_config, score_patches, prepare_scoring, score_images, REDUCES,
    image_scores, SPREAD_FLOOR, ScoreCalibration, AUTO, DETECTORS, DETECTOR_PARTS, UNCALIBRATED, CANDIDATES, FIXED,
    detector_references, score_kinds, detector_maps, raw_scores, PIXEL_KINDS, PIXEL_RESOLUTION, POSITION_RADIUS,
    pixel_cell, pixel_source, pixel_features, PixelReferences, pixel_baseline, HEAD_KINDS)
from cpc_ad.head import (  # noqa: F401
    HEAD_HIDDEN, HEAD_IMAGES, HEAD_STEPS, HEAD_BATCH, HEAD_LR, DefectHead, head_features, fit_head)
from cpc_ad.selection import (  # noqa: F401
    CRITERION, TIE_RULE, BOOTSTRAP, criterion, candidate_table, bootstrap_spread, choose, selection_table)
from cpc_ad.metrics import (  # noqa: F401
    f1_max, aupro, compute_metrics, evaluate_maps, per_defect_auroc, normal_threshold,
    threshold_metrics)
from cpc_ad.probes import (  # noqa: F401
    PROBE_MIN_FRACTION, PROBE_MAX_REFERENCES, prediction_metrics, PROBE_DESCRIPTORS,
    patch_embeddings, pixel_patch_features, patch_defect_fraction, patch_probes, PROBE_FEATURES,
    PROBE_METRICS, probe_representations, PROBE_MARGIN, probe_verdict, mean_pm, probe_table,
    prediction_table)
from cpc_ad.schema import (  # noqa: F401
    SCHEMA_VERSION, BEFORE_SELECTION, PIXEL_MASKS, IMAGE_LABELS_ONLY, PIXEL_METRIC_KEYS, METRIC_KEYS, METRIC_FAMILIES, MetricsRecord, record_keys, read_record,
    SUMMARY_COLUMNS, DERIVED_COLUMNS, TEXT_COLUMNS, COLUMN_LEGEND, SUMMARY_HIDDEN_PARAMETERS,
    HALVES, demo_half, half_rank)
from cpc_ad.plots import (  # noqa: F401
    HEATMAP_CMAP, GROUND_TRUTH_COLOUR, STRIP_MAX_IMAGES, plot_training_curves,
    plot_prediction_accuracy, plot_probes, plot_roc, plot_score_histogram, plot_heatmaps,
    CHOSEN, method_of, fixed_view, method_suffix, method_label, check_one_detector, detector_groups, plot_comparison, has_epoch_series, plot_epochs, save_figure)
from cpc_ad.report import (  # noqa: F401
    load_results, summary_records, summary_table, comparison_table, ladder_table, encoder_verdicts,
    cost_table, parameters_text, summary_markdown, pair_status_table, write_summary, summary_files,
    check_summary_files, PUBLISHED_STUDY, load_published, published_comparison)
from cpc_ad.bundle import (  # noqa: F401
    BUNDLE_FORMAT, BUNDLE_VERSION, READABLE_VERSIONS, IMAGE_HANDLING, colour_mode, save_bundle, Bundle, load_bundle,
    BUNDLE_CONTENTS)
from cpc_ad.inference import (  # noqa: F401
    MASK_COLOUR, find_images, overlay_heatmap, SCORE_COLUMNS, UPSAMPLE_WARNING, score_files)
from cpc_ad.pipeline import (  # noqa: F401
    RunParameters, MODEL_PARAMETERS, SCORING_PARAMETERS, PIXELS_WON, RunPlan, RunData, Evaluated, CPCADResult,
    plan_run, run_identity, cpcad_fingerprint, load_run_data, evaluate, run_cpcad, score_detectors, pretrain_pooled,
    load_init)
from cpc_ad.cli import (  # noqa: F401
    cli_parser, main)

if __name__ == "__main__":
    main()
