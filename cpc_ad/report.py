"""Results trees -> tables: metrics.json files collected into summary.md / summary.csv, the
comparison and epoch-ladder tables of notebook 03, and the sweep's status table."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .files import check_ours, remove_ours, save_text_ours
from .resources import project_file
from .encoders import ENCODERS, build_encoder, count_parameters
from .training import chosen_epoch
from .scoring import DETECTORS, FIXED, REDUCES
from .metrics import _mean_std
from .schema import IMAGE_LABELS_ONLY, PIXEL_MASKS, PIXEL_METRIC_KEYS, COLUMN_LEGEND, HALVES, SUMMARY_COLUMNS, SUMMARY_HIDDEN_PARAMETERS, TEXT_COLUMNS, _budget, _category_order, _encoder_order, _floor, _group, _half, half_rank, _seed, read_record
from .plots import CHOSEN, method_label, method_suffix, _metric_label, save_figure, check_one_detector, detector_groups, has_epoch_series, plot_comparison, plot_epochs


def load_results(root: str | os.PathLike, skip: Iterable[str | os.PathLike] = ()) -> list[dict]:
    """Every metrics.json under `root`, each checked against the schema (`read_record`), as one
    flat dict per run. `skip`: files left out because the caller reports them itself
    (scripts/sweep.py: unreadable ones, as failed pairs).

    Raises ValueError naming the file for one that is not valid JSON (e.g. truncated), not a
    JSON object (a run's record is one object), or not a metrics record of this schema (a
    field missing or renamed: a table must not show it as a blank cell).
    """
    rows = []
    root, skip = Path(root), {Path(p).resolve() for p in skip}
    for path in sorted(root.rglob("metrics.json")):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue  # a staging folder (.<name>.partial) of a run not yet finished
        if path.resolve() in skip:
            continue
        try:
            row = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}): truncated or not a metrics.json; "
                             "run it again, or move it out of the results folder") from e
        if not isinstance(row, dict):
            kind = {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(row), "number")
            raise ValueError(f"{path} holds a JSON {kind}, expected an object (one run's metrics, as notebook 02 "
                             "writes them)")
        rows.append(read_record(row, str(path)).to_dict())
    return rows


def _summary_row(row: dict) -> dict:
    """`row` with the derived columns: half, learned, calibration, seed (top-level or from
    config.parameters), chosen_epoch (from the history for a run that did not record it),
    chosen (how the detector was set: `selection`'s mode)."""
    chosen = row.get("chosen_epoch") or (chosen_epoch(row["history"]) if row.get("history") else None)
    return {**row, "half": _half(row), "learned": (row.get("learning") or {}).get("status", ""),
            "calibration": (row.get("calibration") or {}).get("status", ""),
            "seed": _seed(row), "chosen_epoch": chosen, "chosen": (row.get("selection") or {}).get("mode", "")}


def summary_records(rows: list[dict]) -> list[dict]:
    """`rows` cut to the SUMMARY_COLUMNS (derived ones included): what summary.csv holds."""
    return [{c: r.get(c) for c in SUMMARY_COLUMNS} for r in map(_summary_row, rows)]


def _fmt(column: str, value) -> str:
    """Two decimals for scores (reruns move AUROCs by about 0.02), whole seconds; text as is."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.0f}" if column.endswith("seconds") else f"{value:.2f}"
    return str(value)


def _not_available(row: dict, column: str) -> bool:
    """Whether `column` is a test pixel metric of a run labelled per image only (no ground_truth/)."""
    return (row.get("ground_truth", PIXEL_MASKS) != PIXEL_MASKS and row.get(column) is None
            and column.endswith(PIXEL_METRIC_KEYS) and not column.startswith("val_"))


def summary_table(rows: list[dict], columns: Sequence[str] = SUMMARY_COLUMNS) -> str:
    """A markdown table of `rows`, one line per run, plus a mean line per (half, encoder).

    "half" is the demo half of the category (tuning / confirmation; empty for MVTec AD): the
    tuning half's test numbers are not independent of the choices the study made. Scores
    have two decimals, seconds none (summary.csv keeps full precision).
    """
    rows = [_summary_row(r) for r in rows]
    numeric = [c for c in columns if c not in TEXT_COLUMNS]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    order = {c: i for i, c in enumerate(_category_order(rows))}  # by half, then A-Z
    for r in sorted(rows, key=lambda r: (order[r["category"]], r["encoder"], _budget(r) or 0,
                                         r["seed"] if isinstance(r["seed"], int) else -1)):
        lines.append("| " + " | ".join("n/a" if _not_available(r, c) else _fmt(c, r.get(c)) for c in columns) + " |")
    for half, enc in sorted({(r["half"], r["encoder"]) for r in rows}, key=lambda k: (half_rank(k[0]), k)):
        sel = [r for r in rows if r["encoder"] == enc and r["half"] == half]
        mean = {c: float(np.mean([r[c] for r in sel])) for c in numeric
                if all(isinstance(r.get(c), (int, float)) for r in sel)}
        text = {"category": "**mean**", "half": half, "encoder": enc}
        lines.append("| " + " | ".join(text.get(c, "") if c in TEXT_COLUMNS else _fmt(c, mean.get(c))
                                       for c in columns) + " |")
    return "\n".join(lines) + "\n"


def comparison_table(rows: list[dict], metric: str | Sequence[str] = "image_auroc") -> str:
    """Markdown table Class | Epochs | resnet18v2 | resnet50v2 | densenet | baseline of `metric`.

    One line per (category, epochs asked for: `epochs`, else `epochs_trained`), categories by
    demo half (tuning, confirmation, then others), one column per encoder (registry order, as
    the command line spells them), a baseline column (the raw-pixel baseline, `baseline_<metric>`)
    when the rows have it, and after each half a mean line per epochs: the mean over categories
    of the per-cell means. With several metrics a cell reads "image / pixel". Runs that share a
    cell (seeds) show mean ± std (when they differ); missing runs show "-". Two decimals.
    Every row must come from one detector and image reduction (`check_one_detector`).
    """
    metrics = (metric,) if isinstance(metric, str) else tuple(metric)
    check_one_detector(rows)
    encoders = _encoder_order(rows)
    has_base = any(r.get(f"baseline_{m}") is not None for r in rows for m in metrics)
    columns = encoders + (["baseline"] if has_base else [])
    cell: dict[tuple, list[list[float]]] = {}  # (category, epochs, column) -> values per metric
    for r in rows:
        key = (r["category"], _budget(r))
        for col, prefix in ((r["encoder"], ""), ("baseline", "baseline_")):
            values = cell.setdefault(key + (col,), [[] for _ in metrics])
            for v, m in zip(values, metrics):
                v += [r[prefix + m]] if r.get(prefix + m) is not None else []

    def fmt(values: list[list[float]] | None, spread: bool = True) -> str:
        if not values or not any(values):
            return "-"
        parts = []
        for v in values:
            mean, std = _mean_std(v) if v else (None, 0.0)
            spread_text = f" ± {std:.2f}" if spread and len(set(v)) > 1 else ""
            parts.append("-" if mean is None else f"{mean:.2f}{spread_text}")
        return " / ".join(parts)

    order = {c: i for i, c in enumerate(_category_order(rows))}
    keys = sorted({k[:2] for k in cell}, key=lambda k: (order[k[0]], k[1] or 0))
    halves = {r["category"]: _half(r) for r in rows}
    lines = ["| Class | Epochs | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for half in sorted(set(halves.values()), key=half_rank):
        mine = [k for k in keys if halves[k[0]] == half]
        lines += [f"| {c} | {n} | " + " | ".join(fmt(cell.get((c, n, e))) for e in columns) + " |" for c, n in mine]
        for n in sorted({k[1] for k in mine}, key=lambda n: n or 0):
            per_column = [[cell[c, n, e] for c, n2 in mine if n2 == n and (c, n, e) in cell] for e in columns]
            means = [[[float(np.mean(v[i])) for v in cells if v[i]] for i in range(len(metrics))]
                     for cells in per_column]
            label = f"**mean {half}**" if half else "**mean**"
            lines.append(f"| {label} | {n} | " + " | ".join(fmt(m, spread=False) for m in means) + " |")
    return "\n".join(lines) + "\n"


def _cell_stats(values: list[float], digits: int = 2, each: bool = False) -> str:
    """"0.84" for one run, "0.84 ± 0.02" for several that differ, "-" for none; with `each`,
    every run's value ("38, 40")."""
    if not values:
        return "-"
    if each:
        return ", ".join(f"{v:.{digits}f}" for v in values)
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if len(set(values)) > 1 else "")


def _one_grid(rows: list[dict]) -> None:
    """A like-for-like floor needs one score grid: rows of several (image or patch sizes) are
    refused; rows that record none (older runs) are not checked."""
    grids = {(r.get("score_grid"), r.get("baseline_grid")) for r in rows if r.get("score_grid") is not None}
    if len(grids) > 1:
        raise ValueError(f"the rows were scored on several grids ({', '.join(map(str, sorted(grids, key=str)))}: "
                         "(detector, baseline) G); compare runs of one geometry at a time")


def ladder_table(rows: list[dict], metric: str = "image_auroc", digits: int = 2, each: bool = False) -> str:
    """The study's table for one `metric`: Class | <encoder> e<N> ... | pixel floor.

    One line per category (tuning half, confirmation half, then others), one column per
    encoder (registry order) x epochs asked for (ascending), as an epoch ladder
    (scripts/sweep.py --epochs 20 40 60) or separate runs give them; then the raw-pixel
    floor (same grid and reduction; mean ± std over seeds). Runs that share a cell (seeds)
    show mean ± std; "-" marks a cell with no run. A mean line per half: the mean over its
    categories of the cell means. Rows must come from one detector, image reduction and
    score grid (`check_one_detector`), so no column pools two methods. `digits`: 2 for scores
    (reruns move them by about 0.02), 0 for e.g. `chosen_epoch`; `each`: a cell lists every
    run's value (in seed order) instead of their mean ± std.
    """
    check_one_detector(rows)
    _one_grid(rows)
    encoders = _encoder_order(rows)
    budgets = {e: sorted({_budget(r) for r in rows if r["encoder"] == e}, key=lambda b: b or 0) for e in encoders}
    columns = [(e, b) for e in encoders for b in budgets[e]]
    has_floor = any(r.get(f"baseline_{metric}") is not None for r in rows)
    by_seed = sorted(rows, key=lambda r: (str(type(_seed(r))), _seed(r) if _seed(r) is not None else 0))
    cells = _group(by_seed, metric, lambda r: (r["category"], r["encoder"], _budget(r)))
    head = [f"{e} e{b}" for e, b in columns] + (["pixel floor"] if has_floor else [])
    lines = ["| Class | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    categories = _category_order(rows)
    halves = {c: _half(next(r for r in rows if r["category"] == c)) for c in categories}
    floors = {c: _floor([r for r in rows if r["category"] == c], metric) for c in categories}
    for half in sorted(set(halves.values()), key=half_rank):
        mine = [c for c in categories if halves[c] == half]
        for c in mine:
            values = [_cell_stats(cells.get((c, e, b), []), digits, each) for e, b in columns]
            floor = [_cell_stats(floors[c], digits)] if has_floor else []
            lines.append(f"| {c} | " + " | ".join(values + floor) + " |")
        means = [[float(np.mean(cells[c, e, b])) for c in mine if (c, e, b) in cells] for e, b in columns]
        means += [[float(np.mean(floors[c])) for c in mine if floors[c]]] if has_floor else []
        label = f"**mean {half}**" if half else "**mean**"
        lines.append(f"| {label} | " + " | ".join(f"{np.mean(m):.{digits}f}" if m else "-" for m in means) + " |")
    return "\n".join(lines) + "\n"


def encoder_verdicts(rows: list[dict], metric: str = "image_auroc") -> list[str]:
    """One sentence per category: which encoder scores best, and is its lead real?

    Encoders are compared at the longest training every one of them has in that category (the
    budget asked for, not the best-scoring epoch: picking that on test numbers would flatter
    the winner), by their mean over seeds. The lead over the runner-up counts as larger than
    the seed spread when it exceeds both encoders' standard deviation over seeds; with one
    seed the spread is unknown and the sentence says so. The best's distance from the raw-pixel
    floor closes it.
    """
    check_one_detector(rows)
    words = _metric_label(rows, metric)
    out = []
    for c in _category_order(rows):
        sel = [r for r in rows if r["category"] == c and r.get(metric) is not None]
        encoders = _encoder_order(sel)
        common = set.intersection(*({_budget(r) for r in sel if r["encoder"] == e} for e in encoders)) if sel else set()
        if len(encoders) < 2 or not common:
            out.append(f"{c}: only {encoders[0]} was run." if len(encoders) == 1 else f"{c}: no {metric} recorded."
                       if not encoders else f"{c}: the encoders share no training length, so none is compared.")
            continue
        at = max(common, key=lambda b: b or 0)
        stats = {e: _mean_std([r[metric] for r in sel if r["encoder"] == e and _budget(r) == at]) + (
                 sum(r["encoder"] == e and _budget(r) == at for r in sel),) for e in encoders}
        best, runner = sorted(encoders, key=lambda e: -stats[e][0])[:2]
        (m1, s1, n1), (m2, s2, n2) = stats[best], stats[runner]
        lead = m1 - m2
        text = f"{c}: {best} is best at {at} epochs: {words} {m1:.3f} against {runner}'s {m2:.3f}"
        if min(n1, n2) < 2:
            text += (f"; one seed, so whether its lead of {lead:.3f} is larger than the seed spread is unknown "
                     "(run more: scripts/sweep.py --seeds 0 1 2)")
        else:
            spread = max(s1, s2)
            text += (f"; its lead of {lead:.3f} is {'larger than' if lead > spread else 'within'} the seed spread "
                     f"(std up to {spread:.3f} over {min(n1, n2)} seeds)")
        floor = _floor(sel, metric)
        if floor:
            f = float(np.mean(floor))
            text += f"; against the raw-pixel floor ({f:.3f}) the best is {m1 - f:+.3f}"
        out.append(text + ".")
    return out


# The encoder study this suite reproduces (issue 31): its published image AUROC per MVTec AD
# class, training length and encoder, beside what the same setup gives here.
PUBLISHED_STUDY = project_file("results/reference/published_study.csv")  # also in the wheel


def load_published(path: str | os.PathLike = PUBLISHED_STUDY) -> list[dict]:
    """The published study's table: [{"class", "epochs", "encoder", "image_auroc"}], checked."""
    import csv
    path = Path(path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    want = ["class", "epochs", "encoder", "image_auroc"]
    if not rows or list(rows[0]) != want:
        raise ValueError(f"{path}: expected the columns {','.join(want)} and at least one row")
    out = []
    for i, r in enumerate(rows, 2):
        try:
            row = {"class": r["class"], "epochs": int(r["epochs"]), "encoder": r["encoder"],
                   "image_auroc": float(r["image_auroc"])}
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}, line {i}: {e}; expected a class, whole epochs, an encoder and an AUROC") from e
        if row["encoder"] not in ENCODERS or not 0 <= row["image_auroc"] <= 1:
            raise ValueError(f"{path}, line {i}: encoder {row['encoder']!r} (one of {', '.join(ENCODERS)}) and "
                             f"image AUROC {row['image_auroc']} (between 0 and 1) expected")
        out.append(row)
    return out


def published_comparison(rows: list[dict], published: list[dict] | None = None) -> tuple[str, list[str]]:
    """The published study beside the reproduced runs: (markdown table, verdicts).

    Two lines per (class, epochs) that both have, one column per encoder. First the study's own
    score, pure CPC-AD with the mean reduction (each run's `cpcad_image_auroc_mean`): published /
    reproduced (mean ± std over the runs' seeds) / difference. Then the runs' headline detector
    (`image_auroc`; the rows must share one method, `check_one_detector`) on the same models.
    Per class and training length, one verdict: does the published ranking of the encoders hold
    under the study's score? Runs are matched by category, encoder and the epochs they were asked
    for. With no cell in common the table is empty and the one verdict says why there is
    nothing to compare with.
    """
    if published is None and not PUBLISHED_STUDY.is_file():  # an installed package, away from the repository
        return "", [f"Nothing to compare with: the published study's table ({PUBLISHED_STUDY.name}) is not beside "
                    f"this installation; it is in the repository's results/reference/."]
    published = load_published() if published is None else published
    headline = method_label(check_one_detector(rows)) if rows else ""
    pub = {(p["class"], p["epochs"], p["encoder"]): p["image_auroc"] for p in published}
    key = lambda r: (r["category"], _budget(r), r["encoder"])  # noqa: E731
    ours, beside = _group(rows, "cpcad_image_auroc_mean", key), _group(rows, "image_auroc", key)
    order = dict.fromkeys((p["class"], p["epochs"]) for p in published)  # the published table's order
    shared = [(c, e) for c, e in order if any((c, e, enc) in ours and (c, e, enc) in pub for enc in ENCODERS)]
    if not shared:
        classes = ", ".join(dict.fromkeys(p["class"] for p in published))
        epochs = "/".join(str(e) for e in sorted({p["epochs"] for p in published}))
        found = ", ".join(sorted({f"{r['category']} ({_budget(r)} epochs)" for r in rows})) or "no runs"
        return "", [f"Nothing to compare with: the published study has MVTec AD's {classes} at {epochs} epochs; "
                    f"these results have {found}."]
    encoders = [e for e in ENCODERS if any(p["encoder"] == e for p in published)]
    stats = lambda v: "{:.3f} ± {:.3f}".format(*_mean_std(v)) if len(v) > 1 else f"{v[0]:.3f}"  # noqa: E731
    lines = ["| Class | epochs | score | " + " | ".join(f"{e}: published / reproduced / difference" for e in encoders)
             + " |", "|---|---|---|" + "---|" * len(encoders)]
    verdicts = []
    for c, ep in shared:
        cells, both = [], {}
        for e in encoders:
            p, mine = pub.get((c, ep, e)), ours.get((c, ep, e), [])
            if p is None or not mine:
                cells.append(f"{p:.3f} / - / -" if p is not None else "-")
                continue
            both[e] = (p, float(np.mean(mine)))
            cells.append(f"{p:.3f} / {stats(mine)} / {both[e][1] - p:+.3f}")
        lines.append(f"| {c} | {ep} | pure CPC-AD (mean), the study's score | " + " | ".join(cells) + " |")
        lines.append(f"| {c} | {ep} | {headline} | " + " | ".join(
            f"- / {stats(beside[c, ep, e])} / -" if (c, ep, e) in beside else "-" for e in encoders) + " |")
        if len(both) < 2:
            verdicts.append(f"{c}, {ep} epochs: fewer than two encoders reproduced, so no ranking to compare.")
            continue
        said, found = (sorted(both, key=lambda e: -both[e][i]) for i in (0, 1))
        holds = "holds" if said == found else ("the best holds, the order below it does not" if said[0] == found[0]
                                               else "does NOT hold")
        verdicts.append(f"{c}, {ep} epochs: published {' > '.join(said)}; reproduced {' > '.join(found)}: "
                        f"the published ranking {holds}.")
    return "\n".join(lines) + "\n", verdicts


def cost_table(rows: list[dict]) -> str:
    """Markdown table of what each encoder costs: parameters (the encoder at the runs' width
    and at the standard width 64, the whole CPC-AD model, whose W_k grow as D^2), D, and
    seconds per training epoch and to score the test split (`score_seconds`: bank, references
    and test maps), measured by the runs themselves (mean ± std
    over runs; an epoch ladder's rungs share their epochs, so each chain counts once, by its
    longest rung). Seconds depend on the device and on what ran beside it."""
    longest: dict[tuple, dict] = {}
    for r in rows:
        key = (r["category"], r["encoder"], _seed(r))
        if key not in longest or len(r.get("history") or []) > len(longest[key].get("history") or []):
            longest[key] = r
    lines = ["| Encoder | Encoder parameters | at width 64 | CPC-AD parameters | D | s / epoch | s / test scoring | runs | device |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in _encoder_order(rows):
        sel = [r for r in rows if r["encoder"] == e]
        chains = [r for k, r in longest.items() if k[1] == e]
        epoch_s = [float(np.mean([h["seconds"] for h in r["history"]])) for r in chains if r.get("history")]
        models = sorted({(m["width"], m.get("norm", "layer"), m.get("stem", "imagenet"))
                         for m in (((r.get("config") or {}).get("model") or {}) for r in sel) if m.get("width")})
        widths = ", ".join(str(w) for w, _, _ in models)
        enc_params = ", ".join(f"{count_parameters(build_encoder(e, norm=n, width=w, stem=st)):,}"
                               for w, n, st in models) if e in ENCODERS else ""
        full = f"{count_parameters(build_encoder(e, width=64)):,}" if e in ENCODERS else ""
        cpcad = ", ".join(f"{n:,}" for n in sorted({r["num_parameters"] for r in sel if r.get("num_parameters")}))
        dims = ", ".join(str(d) for d in sorted({r["embedding_dim"] for r in sel if r.get("embedding_dim")}))
        score_s = [r["score_seconds"] for r in sel if r.get("score_seconds") is not None]
        devices = ", ".join(sorted({str(r["device"]) for r in sel if r.get("device")}))
        fmt = lambda v: "-" if not v else f"{_mean_std(v)[0]:.1f}" + (f" ± {_mean_std(v)[1]:.1f}" if len(v) > 1 else "")  # noqa: E731
        lines.append(f"| {e} | {enc_params}{f' (width {widths})' if widths else ''} | {full} | {cpcad} | {dims} | "
                     f"{fmt(epoch_s)} | {fmt(score_s)} | {len(sel)} | {devices} |")
    return "\n".join(lines) + "\n"


def _run_parameters(row: dict) -> dict:
    """The notebook parameters of a run (config.parameters), a None replaced by the value it
    resolved to (config.model / train / grid), minus those that differ by design."""
    cfg = row.get("config") or {}
    resolved = {k: v for part in ("grid", "train", "model") for k, v in (cfg.get(part) or {}).items()}
    return {k: resolved.get(k) if v is None else v for k, v in (cfg.get("parameters") or {}).items()
            if k not in SUMMARY_HIDDEN_PARAMETERS}


def _value_order(text: str) -> tuple:
    """Sort key of a JSON value: numbers by value, before any other value by its text."""
    value = json.loads(text)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return (not number, value if number else 0, text)


def parameters_text(rows: list[dict]) -> str:
    """Markdown lines: the parameters shared by every run, then those that differ between runs."""
    params = [_run_parameters(r) for r in rows if (r.get("config") or {}).get("parameters")]
    if not params:
        return "The runs record no parameters (no `config.parameters` in their metrics.json).\n"
    names = sorted(set().union(*params))
    values = {k: sorted({json.dumps(p.get(k), default=str) for p in params}, key=_value_order) for k in names}
    shared = [k for k in names if len(values[k]) == 1 and all(k in p for p in params)]
    differ = [f"`{k}` ({', '.join('None' if v == 'null' else v for v in values[k])})" for k in names if k not in shared]
    text = "**Parameters** of every run (notebook 02's; a `None` is shown as the default it resolved to): " \
           + (", ".join(f"`{k}={params[0][k]}`" for k in shared) or "none shared") + ".\n"
    if differ:
        text += "\n**Parameters that differ between runs**: " + "; ".join(differ) + ".\n"
    if len(params) < len(rows):
        text += f"\n{len(rows) - len(params)} of {len(rows)} runs record no parameters.\n"
    return text


def _count(n: int, one: str, many: str = "") -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def summary_markdown(rows: list[dict], title: str, written: str = "", pairs: str = "") -> str:
    """summary.md: title, what was run, its parameters, `pairs` (the sweep's `pair_status_table`),
    the class x encoder table, the table of every run and a legend of its columns."""
    categories, encoders = _category_order(rows), _encoder_order(rows)
    per_half = {h: sum(_half(next(r for r in rows if r["category"] == c)) == h for c in categories) for h in HALVES}
    halves = ", ".join(f"{n} {h or 'other'}" for h, n in per_half.items() if n)
    groups = detector_groups(rows)
    tables = []
    for (detector, reduce), group in groups.items():  # never two detectors in one column
        how = f"detector {detector}, " if detector else ""
        how += f"image score: {reduce} of the patch map; " if reduce else ""
        if (detector, reduce) == CHOSEN:
            how = ("each class's detector and image reduction chosen on its own validation set (the `detector` and "
                   "`image_reduce` columns below say which); ")
        elif (detector, reduce) == FIXED and CHOSEN in groups:
            how = (f"one detector for every class, {detector}, image score: {reduce} of the patch map (the runs "
                   "above, scored the same way on every class: encoders like for like); ")
        tables += [f"### {detector or 'unnamed detector'} ({reduce or 'unnamed reduction'})\n" if len(groups) > 1 else "",
                   f"Cells: image AUROC / pixel AUROC ({how}baseline: the raw-pixel baseline on the same grid with "
                   "the same reduction); mean ± std where several runs share a cell; a mean line per demo half. Two "
                   "decimals: reruns move these by about 0.02 (summary.csv has every digit).\n",
                   comparison_table(group, ("image_auroc", "pixel_auroc")),
                   f"![test AUROC by category and encoder]({_comparison_png(detector, reduce, len(groups))})\n"]
    parts = [f"# Results of `{title}`\n",
             f"{_count(len(rows), 'run')} of notebook 02: {_count(len(categories), 'category', 'categories')} "
             f"({halves}: {', '.join(categories)}) x {_count(len(encoders), 'encoder')} ({', '.join(encoders)})."
             + (f" Summary written {written}." if written else "") + "\n",
             parameters_text(rows), _ground_truth_text(rows), pairs,
             "## Test AUROC by category and encoder\n", *tables,
             "## Every run\n", summary_table(rows), "\nColumns:\n",
             "\n".join(f"- `{c}`: {COLUMN_LEGEND[c]}" for c in SUMMARY_COLUMNS) + "\n"]
    return "\n".join(p for p in parts if p)


def _ground_truth_text(rows: list[dict]) -> str:
    """One line naming the categories labelled per image only (no pixel metrics), or nothing."""
    image_only = sorted({r["category"] for r in rows if r.get("ground_truth", PIXEL_MASKS) != PIXEL_MASKS})
    return (f"**Ground truth**: {', '.join(image_only)}: {IMAGE_LABELS_ONLY}.\n") if image_only else ""


def _comparison_png(detector: str | None, reduce: str | None, n_groups: int) -> str:
    """comparison.png for the detectors chosen per class or a tree's only method; one file per
    other method when a results tree holds several (`method_suffix`)."""
    return f"comparison{method_suffix((detector, reduce), n_groups)}.png"


def pair_status_table(status: dict[str, str], failures: dict | None = None, others: Sequence[str] = ()) -> str:
    """Markdown list of a sweep's pairs that did not finish: failed (with the error) or missing;
    `others`: finished pairs in the folder that the sweep did not ask for."""
    failures = failures or {}
    counts = {s: sum(v == s for v in status.values()) for s in ("finished", "failed", "missing")}
    lines = [f"\n**Pairs of the last sweep**: {counts['finished']} finished, {counts['failed']} failed, "
             f"{counts['missing']} missing (not run: the sweep stopped).\n"]
    for pair, state in status.items():
        if state != "finished":
            error = (failures.get(pair, {}).get("error") or "").splitlines()
            lines.append(f"- {pair}: {state}" + (f": {error[0]}" if error else ""))
    if others:
        lines.append(f"\nAlso in this folder, from earlier sweeps with their own parameters (see each "
                     f"metrics.json): {', '.join(sorted(others))}.")
    return "\n".join(lines) + "\n"


def write_summary(run_dir: str | os.PathLike, status: dict[str, str] | None = None,
                  failures: dict | None = None, skip: Iterable[str | os.PathLike] = ()) -> list[dict]:
    """Write summary.md, summary.csv, comparison.png (and epochs.png when some pair has several
    epoch budgets) for a results tree; return its rows.

    status ({"category/encoder[/seed<k>][/e<N>]": "finished" | "failed" | "missing", the runs'
    folders under `run_dir`, from scripts/sweep.py) and
    failures add the pairs that have no current result. The "learned" column flags runs whose
    loss stayed at chance or diverged (`learning_check`). skip: metrics files to leave out
    (`load_results`).
    """
    import csv
    import datetime
    import io
    run_dir = Path(run_dir)
    rows = load_results(run_dir, skip)
    if not rows:
        raise FileNotFoundError(f"no metrics.json under {run_dir}")
    check_summary_files(run_dir)  # a user's summary.md or comparison.png is never replaced: said before any is
    others = {p.parent.relative_to(run_dir).as_posix() for p in run_dir.rglob("metrics.json")
              if not any(part.startswith(".") for part in p.relative_to(run_dir).parts)} - set(status or {})
    written = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = summary_markdown(rows, run_dir.name, written, pair_status_table(status, failures, others) if status else "")
    save_text_ours(text, run_dir / "summary.md")
    buf = io.StringIO()
    w = csv.DictWriter(buf, SUMMARY_COLUMNS)
    w.writeheader()
    w.writerows(summary_records(rows))
    save_text_ours(buf.getvalue(), run_dir / "summary.csv")
    groups = detector_groups(rows)
    for (detector, reduce), group in groups.items():
        save_figure(plot_comparison(group), run_dir / _comparison_png(detector, reduce, len(groups)), tight=False, close=True)
    series = [g for g in groups.values() if has_epoch_series(g)]
    if series:
        save_figure(plot_epochs(max(series, key=len)), run_dir / "epochs.png", tight=False, close=True)
    else:
        remove_ours(run_dir / "epochs.png")  # an earlier summary's, of runs no longer here
    return rows


def summary_files(run_dir: str | os.PathLike) -> list[Path]:
    """Every file `write_summary` may write into `run_dir` (whichever detectors its runs have)."""
    run_dir = Path(run_dir)
    names = ["summary.md", "summary.csv", "epochs.png", _comparison_png(None, None, 1)]
    names += [_comparison_png(d, r, 2) for d in DETECTORS for r in REDUCES]
    return [run_dir / n for n in names]


def check_summary_files(run_dir: str | os.PathLike) -> None:
    """FileExistsError naming the first of `summary_files` that the project did not write
    (`check_ours`): scripts/sweep.py asks before any pair runs, not after hours of training."""
    for path in summary_files(run_dir):
        check_ours(path)
