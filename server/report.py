"""The run report: one self-contained HTML file, built only from the run store.

Written for the radiologist-researcher watching a study: the bias verdict first, then
how each site's AUC moved over the rounds, the final per-site metrics with their
confidence intervals, how the labels are spread over the sites, the numbers behind
each bias test, and the notes (skipped files, metrics that could not be computed).

The file must open on a hospital workstation with no network, so it references no
external resource: plots are inline base64 PNGs (matplotlib, Agg backend), CSS is
inline. Every string is HTML-escaped: site names come from folder names.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any

import matplotlib

from fedir.server.plots import img as _img, plt
from fedir.server.baseline_report import baseline_section, with_clinical_baseline
from fedir.server.bias_report import bias_plots_section
from fedir.server.card_report import card_section
from fedir.server.runstore import GLOBAL_SITE, RunStore
from fedir.server.summary import RATE_METRICS, build_summary, fmt_with_ci, key_numbers

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1f2933;
       max-width: 1100px; margin: 24px auto; padding: 0 16px; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 4px; }
h2 { font-size: 1.2em; border-bottom: 1px solid #d9e2ec; padding-bottom: 4px; margin-top: 32px; }
h3 { font-size: 1.0em; margin-bottom: 4px; }
.meta { color: #52606d; font-size: 0.9em; }
.verdict { border-radius: 6px; padding: 12px 16px; margin: 16px 0; border: 2px solid; }
.verdict.alarm { background: #fde8e8; border-color: #c81e1e; color: #771d1d; }
.verdict.ok { background: #e6f6ec; border-color: #1f8a4c; color: #14532d; }
.verdict .title { font-weight: bold; font-size: 1.15em; }
.verdict ul { margin: 6px 0 0 0; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.92em; }
th, td { border: 1px solid #d9e2ec; padding: 4px 8px; text-align: right; }
th { background: #f0f4f8; }
td.name, th.name { text-align: left; }
tr.global td { font-weight: bold; background: #f8fafc; }
.na { color: #9a6700; cursor: help; border-bottom: 1px dotted #9a6700; }
.yes { color: #c81e1e; font-weight: bold; }
.no { color: #1f8a4c; }
.footnotes { font-size: 0.85em; color: #52606d; }
img.plot { max-width: 100%; border: 1px solid #eef2f6; }
.muted { color: #7b8794; font-style: italic; }
"""

# Friendly names of the numbers bias tests report; unknown keys are shown as they are.
_LABELS = {
    "chi2": "chi-square", "chi_square": "chi-square", "dof": "degrees of freedom",
    "p_value": "p-value", "cramers_v": "Cramer's V", "pooled_auc": "pooled AUC",
    "within_auc": "mean within-site AUC", "gap": "gap (pooled - within)", "alarm": "alarm",
}
_METRIC_NAMES = {"auc": "AUC", "accuracy": "accuracy", "sensitivity": "sensitivity",
                 "specificity": "specificity"}
_NOTE_KINDS = {"null_metric": "metric not computed", "rejected": "update rejected"}
_SKIPPED_TEST_KEYS = {"table", "prevalence", "reason", "alarm", "matrix", "pairwise", "site_se",
                      "per_site_class_accuracy", "site_gap"}


def write_report(store: RunStore, run_id: str, path: Path) -> Path:
    """Render ``run_id`` from ``store`` into the HTML file ``path`` and return it."""
    summary = build_summary(store, run_id)
    rows = store.metric_rows(run_id)
    sections = [
        _header(summary),
        _verdict_box(summary["bias"]),
        _auc_section(rows, summary["sites"]),
        _site_table_section(summary),
        baseline_section(with_clinical_baseline(summary, path.parent, store.run(run_id)["config"])),
        _histogram_section(store, run_id, summary),
        _label_section(store, run_id, summary["bias"]),
        bias_plots_section(summary["bias"]),
        _bias_tests_section(summary["bias"]),
        _training_section(rows, summary["sites"]),
        card_section(store.cards(run_id)),
        _notes_section(summary["notes"]),
    ]
    title = escape(f"fedir run {run_id}")
    html = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{title}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path


# ---- sections -------------------------------------------------------------------------


def _header(summary: dict) -> str:
    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    facts = [
        ("scenario", summary["scenario"]), ("status", summary["status"]),
        ("started", summary["started_at"]), ("finished", summary["finished_at"] or "-"),
        ("rounds", summary["rounds"]), ("evaluated round", summary["evaluated_round"]),
        ("sites", len(summary["sites"])), ("report generated", generated),
    ]
    meta = " &middot; ".join(f"{escape(k)}: <b>{escape(str(v))}</b>" for k, v in facts)
    return f"<h1>fedir run {escape(summary['run_id'])}</h1>\n<div class=\"meta\">{meta}</div>"


def _verdict_box(bias: dict) -> str:
    """Red with the reasons when the alarm is raised, green with the tests' numbers when it
    is not, plain with its reason when no verdict could be computed (alarm null)."""
    alarm = bool(bias.get("alarm"))
    title = ("BIAS ALARM: the label may be confounded with the site" if alarm
             else "Bias verdict not computed" if bias.get("alarm") is None else "No bias alarm")
    items = "".join(f"<li>{escape(str(r))}</li>" for r in bias.get("reasons") or [])
    numbers = "".join(
        f"<li>{escape(name.replace('_', ' '))}: {escape(text)}</li>"
        for name, text in key_numbers(bias).items() if text
    )
    css = "alarm" if alarm else "" if bias.get("alarm") is None else "ok"
    reasons = f"<ul>{items}</ul>" if items else ""
    return (f'<div class="verdict {css}"><div class="title">{escape(title)}</div>{reasons}'
            f'<div class="muted">Every test\'s numbers:</div><ul class="muted">{numbers}</ul></div>')


def _auc_section(rows: list[dict], sites: list[str]) -> str:
    series = _series(rows, "test", "auc")
    if not series:
        return '<h2>AUC by round</h2><p class="muted">No AUC was recorded.</p>'
    fig, ax = plt.subplots(figsize=(10, 4.2), dpi=100)
    colours = _site_colours(sites)
    for site in [*sites, GLOBAL_SITE]:
        if series.get(site):
            _plot_with_band(ax, site, colours[site], series[site])
    ax.axhline(0.5, color="#9aa5b1", linewidth=0.8, linestyle=":")
    ax.set(xlabel="round", ylabel="AUC (test patients)", ylim=(0, 1.02))
    ax.set_xticks(sorted({r for points in series.values() for r, _ in points}))
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    caption = ("Each site's test AUC of the global model, with its 95% bootstrap CI as a band; "
               "the pooled (global) AUC is the thick black line. A pooled AUC well above every "
               "site's own AUC suggests the model separates hospitals rather than disease.")
    return f"<h2>AUC by round</h2>{_img(fig)}<p class=\"footnotes\">{escape(caption)}</p>"


def _plot_with_band(ax: Any, site: str, colour: str, points: list[tuple[int, dict]]) -> None:
    rounds = [r for r, _ in points]
    values = [p["value"] for _, p in points]
    width = 2.5 if site == GLOBAL_SITE else 1.5
    ax.plot(rounds, values, marker="o", markersize=4, label=site, color=colour, linewidth=width)
    banded = [(r, p["ci_low"], p["ci_high"]) for r, p in points if p["ci_low"] is not None]
    if banded:
        r, lo, hi = zip(*banded)
        ax.fill_between(r, lo, hi, color=colour, alpha=0.12 if site == GLOBAL_SITE else 0.18)


def _site_table_section(summary: dict) -> str:
    footnotes: list[str] = []
    header = "".join(
        f"<th>{escape(h)}</th>" for h in ["n test", "patients", "positives",
                                          *(f"{_METRIC_NAMES[m]} [95% CI]" for m in RATE_METRICS)]
    )
    body = [_site_row(site, e, footnotes, "") for site, e in summary["per_site"].items()]
    body.append(_site_row(GLOBAL_SITE + " (pooled)", summary["global"], footnotes, "global"))
    notes = "".join(f"<li>{n}</li>" for n in footnotes)
    notes_html = f'<ol class="footnotes">{notes}</ol>' if footnotes else ""
    return (
        f"<h2>Final per-site metrics (round {escape(str(summary['evaluated_round']))})</h2>"
        f'<table><tr><th class="name">site</th>{header}</tr>{"".join(body)}</table>{notes_html}'
    )


def _site_row(site: str, entry: dict, footnotes: list[str], css: str) -> str:
    cells = [_int_cell(entry.get("n_test")), _int_cell(entry.get("n_patients")),
             _int_cell(entry.get("positives"))]
    for metric in RATE_METRICS:
        value = entry.get(metric)
        if value is None:
            reason = entry["reasons"].get(metric, "not computed")
            footnotes.append(f"{escape(site)}, {escape(metric)}: {escape(str(reason))}")
            cells.append(f'<span class="na" title="{escape(str(reason))}">n/a</span>'
                         f"<sup>{len(footnotes)}</sup>")
        else:
            cells.append(escape(fmt_with_ci(value, entry.get(metric + "_ci"))))
    tds = "".join(f"<td>{c}</td>" for c in cells)
    return f'<tr class="{css}"><td class="name">{escape(site)}</td>{tds}</tr>'


def _histogram_section(store: RunStore, run_id: str, summary: dict) -> str:
    """Score histograms per site: a site whose positives all score high is visible at once."""
    server_round = summary["evaluated_round"]
    if server_round is None:
        return ""
    metrics = store.site_metrics(run_id, server_round)
    names = [s for s in [*summary["sites"], GLOBAL_SITE]
             if metrics.get(s, {}).get("hist_neg") is not None or metrics.get(s, {}).get("hist_pos") is not None]
    if not names:
        return ""
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.1 * rows), dpi=100, squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, site in zip(axes.flat, names):
        _plot_histogram(ax, site, metrics[site])
    axes.flat[0].legend(fontsize=7, frameon=False)
    fig.tight_layout()
    caption = ("Distribution of the model's score on each site's test images, negatives (blue) "
               "and positives (red), at the last evaluated round; only these bin counts leave a site.")
    return f"<h2>Score histograms</h2>{_img(fig)}<p class=\"footnotes\">{escape(caption)}</p>"


def _plot_histogram(ax: Any, site: str, metrics: dict) -> None:
    for key, colour, label in (("hist_neg", "#1f77b4", "negative"), ("hist_pos", "#d62728", "positive")):
        counts = metrics.get(key) or []
        if counts:
            width = 1.0 / len(counts)
            edges = [i * width for i in range(len(counts))]
            ax.bar(edges, counts, width=width, align="edge", color=colour, alpha=0.5, label=label)
    ax.set_title(site, fontsize=9)
    ax.set_xlim(0, 1)
    ax.tick_params(labelsize=7)
    ax.set_xlabel("score", fontsize=7)


def _label_section(store: RunStore, run_id: str, bias: dict) -> str:
    table = _label_table(store, run_id, bias)
    if not table:
        return '<h2>Labels by site</h2><p class="muted">No label counts were recorded.</p>'
    classes = sorted({c for counts in table.values() for c in counts}, key=_class_order)
    head = "".join(f"<th>class {escape(c)}</th>" for c in classes)
    head += "<th>total</th>" + "".join(f"<th>% class {escape(c)}</th>" for c in classes)
    rows = []
    for site, counts in table.items():
        total = sum(counts.values())
        cells = [str(counts.get(c, 0)) for c in classes] + [str(total)]
        cells += [f"{100 * counts.get(c, 0) / total:.1f}%" if total else "n/a" for c in classes]
        rows.append(f'<tr><td class="name">{escape(site)}</td>'
                    + "".join(f"<td>{escape(c)}</td>" for c in cells) + "</tr>")
    caption = ("Labelled training patients per class at each site and the class prevalence. "
               "Very different prevalences across sites let a model learn the hospital instead "
               "of the disease (a \"Frankenstein\" federation).")
    return (f'<h2>Labels by site</h2><table><tr><th class="name">site</th>{head}</tr>'
            f'{"".join(rows)}</table><p class="footnotes">{escape(caption)}</p>')


def _label_table(store: RunStore, run_id: str, bias: dict) -> dict[str, dict[str, int]]:
    """The site-label table the bias test used, else the last recorded training label counts."""
    test = (bias.get("tests") or {}).get("site_label_association") or {}
    if isinstance(test.get("table"), dict) and test["table"]:
        return {str(s): {str(c): int(n) for c, n in row.items()} for s, row in test["table"].items()}
    latest: dict[str, dict[str, int]] = {}
    for vector in store.vectors(run_id):
        if vector["split"] == "train" and "label" in vector["name"] and isinstance(vector["json"], dict):
            latest[vector["site"]] = {str(c): int(n) for c, n in vector["json"].items()}
    return latest


def _class_order(name: str) -> tuple[int, str]:
    return (int(name), "") if name.lstrip("-").isdigit() else (1 << 30, name)


def _bias_tests_section(bias: dict) -> str:
    tests = bias.get("tests") or {}
    if not tests:
        return '<h2>Bias tests</h2><p class="muted">No bias test was recorded.</p>'
    blocks = [_bias_test_block(name, test) for name, test in tests.items() if isinstance(test, dict)]
    return "<h2>Bias tests</h2>" + "".join(blocks)


def _bias_test_block(name: str, test: dict) -> str:
    alarm = test.get("alarm")
    flag = ('<span class="yes">ALARM</span>' if alarm else '<span class="no">no alarm</span>')
    rows = [
        f'<tr><td class="name">{escape(_LABELS.get(k, k.replace("_", " ")))}</td><td>{escape(_fmt_any(v))}</td></tr>'
        for k, v in test.items() if k not in _SKIPPED_TEST_KEYS
    ]
    reason = f"<p>{escape(str(test['reason']))}</p>" if test.get("reason") else ""
    table = f"<table>{''.join(rows)}</table>" if rows else ""
    return f"<h3>{escape(name.replace('_', ' '))}: {flag}</h3>{reason}{table}"


def _training_section(rows: list[dict], sites: list[str]) -> str:
    series = _series(rows, "train", "train_loss")
    if not series:
        return ""
    fig, ax = plt.subplots(figsize=(10, 3.2), dpi=100)
    colours = _site_colours(sites)
    for site in sites:
        if series.get(site):
            ax.plot([r for r, _ in series[site]], [p["value"] for _, p in series[site]],
                    marker="o", markersize=4, label=site, color=colours[site])
    ax.set(xlabel="round", ylabel="local training loss")
    ax.set_xticks(sorted({r for points in series.values() for r, _ in points}))
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    return f"<h2>Training loss by round</h2>{_img(fig)}"


def _notes_section(notes: list[dict]) -> str:
    if not notes:
        return '<h2>Notes</h2><p class="muted">No notes: no skipped files, no missing metrics.</p>'
    head = "".join(f"<th class=\"name\">{h}</th>" for h in ("round", "site", "kind", "message"))
    rows = []
    for note in notes:
        message = note["message"] if not note.get("metric") else f"{note['metric']}: {note['message']}"
        cells = ["-" if note["round"] is None else str(note["round"]), note["site"] or "-",
                 _NOTE_KINDS.get(note["kind"], note["kind"]), message]
        rows.append("<tr>" + "".join(f'<td class="name">{escape(str(c))}</td>' for c in cells) + "</tr>")
    return f"<h2>Notes</h2><table><tr>{head}</tr>{''.join(rows)}</table>"


# ---- helpers ---------------------------------------------------------------------------


def _series(rows: list[dict], split: str, metric: str) -> dict[str, list[tuple[int, dict]]]:
    """``{site: [(round, row), ...]}`` of one metric's non-null values, by round."""
    out: dict[str, list[tuple[int, dict]]] = defaultdict(list)
    for row in rows:
        if row["split"] == split and row["metric"] == metric and row["value"] is not None:
            out[row["site"]].append((row["round"], row))
    return {site: sorted(points, key=lambda p: p[0]) for site, points in out.items()}


def _site_colours(sites: list[str]) -> dict[str, str]:
    """One colour per site for every plot, so a site is recognisable across figures."""
    palette = plt.get_cmap("tab10" if len(sites) <= 10 else "tab20").colors
    colours = {site: matplotlib.colors.to_hex(palette[i % len(palette)]) for i, site in enumerate(sites)}
    return {**colours, GLOBAL_SITE: "#000000"}


def _int_cell(value: Any) -> str:
    return "n/a" if value is None else escape(str(value))


def _fmt_any(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "n/a"}[value]
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} = {_fmt_any(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_fmt_any(v) for v in value)
    return str(value)
