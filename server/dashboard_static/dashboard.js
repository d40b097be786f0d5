// fedir dashboard: polls /api/runs and /api/run, lays out what they return.
// Every number arrives formatted by the server (as the terminal table formats it); this file
// only builds DOM nodes (textContent, never innerHTML: site names come from folder names).
"use strict";

// per patient first (a patient's score: the mean over their images), per image beside
const METRICS = {
  patient_auc: "AUC per patient", patient_accuracy: "accuracy per patient",
  patient_sensitivity: "sensitivity per patient", patient_specificity: "specificity per patient",
  auc: "AUC per image", accuracy: "accuracy per image", sensitivity: "sensitivity per image", specificity: "specificity per image",
};
const TABLE_COLUMNS = ["patients", "patient_positives", "patient_auc", "patient_accuracy", "patient_sensitivity",
  "patient_specificity", "ece", "n_test", "positives", "auc", "accuracy", "sensitivity", "specificity"];
// A run of another task kind (survival, segmentation, K > 2 classes) sends its own table columns
// ([key, heading] pairs), plotted metrics and the metrics not on a 0..1 scale (unbounded) with
// its detail (server/dashboard_state.view_of); these defaults are the binary classification ones.
let defaultTableHead = null;
const MAX_BANDS = 12; // above this many sites, per-site CI bands only for the site chosen
const MAX_CHIPS = 24; // above this many sites, the ones that answered are listed on request
const MAX_ROUND_TICKS = 20; // up to this many rounds, one x tick per round
const state = { poll: 2, selected: null, fingerprint: null, detail: null, runs: [] };

// plotly.min.js is a few MB of JavaScript: parsing it holds the page for a moment (seconds on
// a busy machine). So it is loaded only once the first data is on screen: the verdict and the
// tables show at once, the plots follow as soon as plotly is ready.
let plotlyLoaded, plotlyFailed;
const plotlyReady = new Promise((resolve, reject) => { plotlyLoaded = resolve; plotlyFailed = reject; });
function loadPlotly() {
  if (document.getElementById("plotly-js")) return;
  const script = el("script", { id: "plotly-js", src: "/static/plotly.min.js" });
  script.onload = plotlyLoaded;
  script.onerror = () => plotlyFailed(new Error("plotly.min.js did not load: the plots cannot be drawn"));
  document.head.append(script);
}
function whenPlotly(draw) { plotlyReady.then(draw, (err) => showProblem(err.message)); }

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value; else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

// Plotly draws trace names and hover text as its own small HTML (<b>, <br>, <a href>...): a
// site or run name goes in with &, < and > as entities, so it is shown as typed, never as markup.
function plotlyText(text) { return String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;"); }

function fmt(value) { return value === null || value === undefined ? "n/a" : value.toFixed(3); }
function runKey(run) { return run.source + "/" + run.run_id; }

async function getJSON(url) {
  const response = await fetch(url, { cache: "no-store" });
  if (!response.ok) throw new Error(url + ": HTTP " + response.status);
  return response.json();
}

function showProblem(message) {
  const box = document.getElementById("error");
  box.hidden = !message;
  box.textContent = message ? message + " (this page checks again every " + state.poll + " s)" : "";
}

// ---- runs overview ------------------------------------------------------------------------

function renderRuns(data) {
  document.getElementById("folder").textContent = data.folder;
  state.runs = data.runs;
  document.getElementById("runs-section").hidden = data.runs.length === 0;
  const body = document.querySelector("#runs tbody");
  body.replaceChildren(...data.runs.map((run) => {
    const rounds = run.rounds_done + (run.rounds_planned ? " / " + run.rounds_planned : "");
    const alarm = run.alarm === null ? el("span", { class: "muted" }, "not yet")
      : el("span", { class: run.alarm ? "yes" : "no" },
        (run.alarm ? "ALARM" : "no alarm") + (run.verdict_final ? "" : " (provisional)"));
    const row = el("tr", { "data-run": runKey(run), class: runKey(run) === state.selected ? "selected" : "" },
      el("td", { class: "name" }, run.run_id), el("td", { class: "name" }, run.source),
      el("td", { class: "name" }, run.scenario), el("td", { class: "name status-" + run.status }, run.status),
      el("td", {}, rounds), el("td", {}, run.n_sites),
      el("td", {}, fmt(run.global_auc) + (run.metric_name !== "AUC" ? " (" + run.metric_name + ")" : "")), el("td", {}, alarm));
    row.addEventListener("click", () => select(runKey(run)));
    return row;
  }));
  const plot = document.getElementById("compare-plot");
  plot.hidden = data.runs.length < 2 || !data.runs.some((run) => run.auc_series.length > 0);
  whenPlotly(() => renderComparison(data.runs));
}

function renderComparison(runs) {
  const plot = document.getElementById("compare-plot");
  const shown = runs.filter((run) => run.auc_series.length > 0);
  const drawn = JSON.stringify(shown.map((run) => [runKey(run), run.auc_series.length, run.global_auc]));
  if (plot.hidden || drawn === plot.dataset.drawn) return;
  plot.dataset.drawn = drawn;
  const traces = shown.map((run) => ({
    x: run.auc_series.map((p) => p[0]), y: run.auc_series.map((p) => p[1]), mode: "lines+markers",
    name: plotlyText(run.source === "." ? run.run_id : run.source + " / " + run.run_id),
  }));
  const rounds = Math.max(...shown.map((run) => run.auc_series.length));
  const name = "pooled " + [...new Set(shown.map((run) => run.metric_name))].join(" or ");
  Plotly.react(plot, traces, layout(name + " by round, every run", name, rounds), { displaylogo: false, responsive: true });
}

function defaultRun(runs) {
  const running = runs.filter((run) => run.status === "running");
  const pick = running.length ? running[running.length - 1] : runs[runs.length - 1];
  return pick ? runKey(pick) : null;
}

function select(key) {
  state.selected = key;
  state.fingerprint = null;
  history.replaceState(null, "", "#" + encodeURIComponent(key));
  for (const row of document.querySelectorAll("#runs tbody tr")) {
    row.classList.toggle("selected", row.dataset.run === key);
  }
  return refreshRun();
}

// ---- one run ------------------------------------------------------------------------------

async function refreshRun() {
  const run = state.runs.find((r) => runKey(r) === state.selected);
  if (!run) { document.getElementById("run-section").hidden = true; return; }
  const query = new URLSearchParams({ source: run.source, run: run.run_id });
  if (state.fingerprint) query.set("since", state.fingerprint);
  const detail = await getJSON("/api/run?" + query);
  if (detail.error) { showProblem(detail.error); return; }
  if (detail.unchanged) return;
  state.fingerprint = detail.fingerprint;
  state.detail = detail;
  renderRun(detail);
}

function renderRun(detail) {
  document.getElementById("run-section").hidden = false;
  const run = detail.run;
  document.getElementById("run-title").textContent = "Run " + run.run_id + " (" + run.scenario + ")";
  const planned = run.rounds_planned;
  const line = "status: " + run.status + " \u00b7 rounds evaluated: " + run.rounds_evaluated
    + (planned ? " of " + planned : "") + " \u00b7 sites: " + run.sites.length
    + " \u00b7 started " + run.started_at + (run.finished_at ? " \u00b7 finished " + run.finished_at : "");
  const progress = document.getElementById("progress-line");
  progress.textContent = line;
  progress.className = "meta status-" + run.status;
  const share = planned ? Math.min(1, run.rounds_evaluated / planned) : (run.status === "running" ? 0 : 1);
  document.getElementById("progress-bar").style.width = (100 * share).toFixed(1) + "%";
  renderPrivacy(detail.privacy);
  renderVerdict(detail.verdict);
  renderRound(detail.round, run.sites.length);
  renderControls(run.sites, detail.series, detail.metrics);
  whenPlotly(renderPlots);
  renderTable(detail.table, run.selection.round, detail.columns);
  renderThreshold(detail);
  renderCards(detail.cards);
  renderNotes(detail.notes);
}

// Under privacy.dp: the epsilon spent so far and each accounted round's figure
// (fedir.strategies.privacy_budget); a null epsilon is an infinite one (no noise), or none
// at all when the strategy is not a mean (the accountant says so).
function renderPrivacy(privacy) {
  const box = document.getElementById("privacy-line");
  box.hidden = !privacy || privacy.mode === "off";
  if (box.hidden) return;
  const unknown = privacy.accountant.startsWith("none") ? "not accounted" : "infinite";
  const eps = (value) => value === null ? unknown : value.toFixed(3);
  const perRound = privacy.per_round.map(([round, value]) => "r" + round + " " + eps(value)).join(", ");
  box.textContent = "privacy (" + privacy.mode + "): epsilon " + eps(privacy.epsilon) + " at delta "
    + privacy.delta + " after " + privacy.rounds_accounted + " round(s)"
    + (privacy.max_epsilon ? " of max " + privacy.max_epsilon : "")
    + (perRound ? " \u00b7 per round: " + perRound : "")
    + (privacy.stopped ? " \u00b7 " + privacy.stopped : "");
}

function renderVerdict(verdict) {
  const box = document.getElementById("verdict");
  if (verdict.round === null) {
    box.className = "verdict none";
    box.replaceChildren(el("div", { class: "title" }, "No bias verdict yet: no round has been evaluated"));
    return;
  }
  box.className = "verdict " + (verdict.alarm ? "alarm" : "ok") + (verdict.final ? " final" : " provisional");
  const title = verdict.alarm ? "BIAS ALARM: the label may be confounded with the site" : "No bias alarm";
  // a running study's verdict is its latest round's: the next round may change it
  const status = verdict.final ? "final" : "provisional";
  const numbers = Object.entries(verdict.numbers).map(([name, text]) => name + ": " + text).join(" \u00b7 ");
  const history = verdict.alarm_rounds.length
    ? "alarm raised in round(s) " + ranges(verdict.alarm_rounds) : "no round has raised the alarm";
  const perRound = "per-round verdicts (provisional): "
    + verdict.history.map(([round, alarm]) => "r" + round + " " + (alarm === null ? "n/a" : alarm ? "ALARM" : "no")).join(", ")
    + " \u00b7 the verdict changed " + verdict.changes + " time(s)";
  const parts = [el("div", { class: "title" }, title + " (round " + verdict.round + ", " + status + ")")];
  if (verdict.reasons.length) parts.push(el("ul", { class: "reasons" }, ...verdict.reasons.map((r) => el("li", {}, r))));
  if (verdict.warnings && verdict.warnings.length) {
    parts.push(el("div", { class: "numbers" }, "Warnings (secondary signals, not enough for an alarm):"),
      el("ul", { class: "warnings" }, ...verdict.warnings.map((w) => el("li", {}, w))));
  }
  parts.push(el("div", { class: "numbers" }, numbers), el("div", { class: "numbers" }, history),
    el("div", { class: "numbers history" }, perRound));
  box.replaceChildren(...parts);
}

// [1, 2, 3, 7, 9, 10] -> "1-3, 7, 9-10"
function ranges(rounds) {
  const parts = [];
  for (let i = 0; i < rounds.length; i++) {
    let j = i;
    while (j + 1 < rounds.length && rounds[j + 1] === rounds[j] + 1) j++;
    parts.push(j > i ? rounds[i] + "\u2013" + rounds[j] : String(rounds[i]));
    i = j;
  }
  return parts.join(", ");
}

function chips(names, kind) {
  return el("div", { class: "chips" }, ...names.map((name) => el("span", { class: "chip " + kind }, name)));
}

function renderRound(round, nSites) {
  const box = document.getElementById("round-status");
  if (round.round === null) {
    box.replaceChildren(el("div", { class: "muted" }, round.stage));
    return;
  }
  const parts = [
    el("div", { class: "round-line" }, "Round " + round.round + " (" + round.stage + "): "
      + round.answered.length + " of " + nSites + " sites answered"),
    round.answered.length <= MAX_CHIPS ? chips(round.answered, "answered")
      : el("details", {}, el("summary", {}, "show the " + round.answered.length + " sites that answered"),
        chips(round.answered, "answered")),
  ];
  if (round.missing.length) {
    parts.push(el("div", { class: "round-line" }, round.missing.length + " site(s) without a reply this round:"),
      chips(round.missing, "missing"));
  }
  for (const [notes, kind, label] of [[round.failed, "missing", "failed"], [round.rejected, "rejected", "rejected"]]) {
    if (notes.length) {
      parts.push(el("div", { class: "round-line" }, notes.length + " " + label + ":"),
        el("ul", { class: kind }, ...notes.map((n) => el("li", {}, (n.site || "?") + ": " + n.message))));
    }
  }
  if (!round.rejected.length) parts.push(el("div", { class: "round-line muted" }, "no update rejected this round"));
  box.replaceChildren(...parts);
}

function renderControls(sites, series, metrics) {
  const metric = document.getElementById("metric");
  const names = metrics || METRICS;
  const keys = Object.keys(names);
  if (Array.from(metric.options).map((o) => o.value).join("\n") !== keys.join("\n")) {
    metric.replaceChildren(...Object.entries(names).map(([key, name]) => el("option", { value: key }, name)));
    if (!metric.dataset.bound) { metric.addEventListener("change", () => whenPlotly(renderPlots)); metric.dataset.bound = "1"; }
    // the first metric with a series leads: a run whose labels are per image has no per-patient one
    metric.value = keys.find((key) => Object.keys(series[key] || {}).length > 0) || keys[0];
  }
  const focus = document.getElementById("site-focus");
  const wanted = ["", ...sites];
  const have = Array.from(focus.options).map((o) => o.value);
  if (wanted.join("\n") !== have.join("\n")) {
    const keep = focus.value;
    focus.replaceChildren(el("option", { value: "" }, "all sites"), ...sites.map((s) => el("option", { value: s }, s)));
    focus.value = sites.includes(keep) ? keep : "";
    if (!focus.dataset.bound) { focus.addEventListener("change", () => whenPlotly(renderPlots)); focus.dataset.bound = "1"; }
  }
}

function colour(index, count) {
  const palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
  if (count <= palette.length) return palette[index % palette.length];
  return "hsl(" + Math.round((360 * index) / count) + ", 65%, 45%)";
}

function withAlpha(css, alpha) {
  if (css.startsWith("#")) {
    const n = parseInt(css.slice(1), 16);
    return "rgba(" + (n >> 16) + "," + ((n >> 8) & 255) + "," + (n & 255) + "," + alpha + ")";
  }
  return css.replace("hsl(", "hsla(").replace(")", ", " + alpha + ")");
}

function bandTraces(points, name, css, showBand, width) {
  const x = points.map((p) => p[0]);
  const traces = [];
  const banded = points.filter((p) => p[2] !== null && p[3] !== null);
  if (showBand && banded.length) {
    traces.push({ x: banded.map((p) => p[0]), y: banded.map((p) => p[3]), mode: "lines", line: { width: 0 },
      hoverinfo: "skip", showlegend: false, legendgroup: name });
    traces.push({ x: banded.map((p) => p[0]), y: banded.map((p) => p[2]), mode: "lines", line: { width: 0 },
      fill: "tonexty", fillcolor: withAlpha(css, 0.15), hoverinfo: "skip", showlegend: false, legendgroup: name });
  }
  const text = points.map((p) => (p[2] === null ? fmt(p[1]) : fmt(p[1]) + " [" + fmt(p[2]) + ", " + fmt(p[3]) + "]"));
  const shown = plotlyText(name);
  traces.push({ x, y: points.map((p) => p[1]), text, mode: "lines+markers", name: shown, legendgroup: name,
    line: { color: css, width }, marker: { size: 5 }, hovertemplate: shown + " round %{x}: %{text}<extra></extra>" });
  return traces;
}

function layout(title, yTitle, rounds, unbounded) {
  const ticks = rounds <= MAX_ROUND_TICKS ? { dtick: 1 } : { tickformat: "d" };
  return {
    title: { text: title, font: { size: 14 } }, margin: { l: 55, r: 10, t: 36, b: 40 },
    xaxis: { title: { text: "round" }, rangemode: "tozero", ...ticks },
    yaxis: { title: { text: yTitle }, ...(unbounded ? { rangemode: "tozero" } : { range: [0, 1.02] }) },
    legend: { font: { size: 10 } },
    hovermode: "closest", uirevision: "keep",
  };
}

function renderPlots() {
  const detail = state.detail;
  if (!detail) return;
  const names = detail.metrics || METRICS;
  const chosen = document.getElementById("metric").value;
  const metric = chosen in names ? chosen : Object.keys(names)[0];
  const focus = document.getElementById("site-focus").value;
  const series = detail.series[metric] || {};
  const name = names[metric];
  const unbounded = (detail.unbounded || []).includes(metric);
  const config = { displaylogo: false, responsive: true };
  Plotly.react("global-plot", bandTraces(series.global || [], "global (pooled)", "#000000", true, 2.5),
    layout("pooled " + name + " by round", name, detail.run.rounds_evaluated, unbounded), config);
  const sites = detail.run.sites;
  const traces = [];
  sites.forEach((site, i) => {
    if (focus && focus !== site) return;
    const showBand = focus === site || sites.length <= MAX_BANDS;
    traces.push(...bandTraces(series[site] || [], site, colour(i, sites.length), showBand, 1.5));
  });
  const title = "per-site " + name + " by round" + (!focus && sites.length > MAX_BANDS ? " (choose a site to see its CI band)" : "");
  Plotly.react("site-plot", traces, layout(title, name, detail.run.rounds_evaluated, unbounded), config);
}

// The table is summary.json's: the selected round's test metrics (chosen on validation,
// fedir.strategies.selection), not necessarily the latest round's.
function renderTable(rows, selectedRound, columns) {
  document.getElementById("table-title").textContent = selectedRound
    ? "Per-site test metrics, selected round " + selectedRound + " (as in summary.json)"
    : "Per-site metrics (no round evaluated yet)";
  const head = document.querySelector("#site-table thead");
  if (defaultTableHead === null) defaultTableHead = Array.from(head.childNodes, (n) => n.cloneNode(true));
  if (columns) {
    head.replaceChildren(el("tr", {}, el("th", { class: "name" }, "site"), ...columns.map(([, heading]) => el("th", {}, heading))));
  } else if (head.dataset.kind) {
    head.replaceChildren(...defaultTableHead.map((n) => n.cloneNode(true)));
  }
  head.dataset.kind = columns ? "own" : "";
  const shown = columns ? columns.map(([key]) => key) : TABLE_COLUMNS;
  const footnotes = [];
  const body = document.querySelector("#site-table tbody");
  body.replaceChildren(...rows.map((row) => {
    const cells = shown.map((column) => {
      const reason = row.reasons[column];
      if (row[column] === "n/a" && reason) {
        footnotes.push(row.site + ", " + column + ": " + reason);
        return el("td", { "data-col": column }, el("span", { class: "value na", title: reason }, "n/a"), el("sup", {}, footnotes.length));
      }
      return el("td", { "data-col": column }, el("span", { class: "value" }, row[column]));
    });
    return el("tr", { "data-site": row.site, class: row.site === "global" ? "global" : "" },
      el("td", { class: "name", "data-col": "site" }, row.site === "global" ? "global (pooled)" : row.site), ...cells);
  }));
  document.getElementById("table-notes").replaceChildren(...footnotes.map((f) => el("li", {}, f)));
}

function renderThreshold(detail) {
  document.getElementById("threshold-note").textContent = [detail.threshold, detail.binning].filter(Boolean).join(" ");
}

function renderCards(cards) {
  const box = document.getElementById("cards");
  const sites = Object.keys(cards);
  if (!sites.length) {
    box.replaceChildren(el("p", { class: "muted" }, "No site data card has been recorded for this run."));
    return;
  }
  box.replaceChildren(el("div", { class: "cards" }, ...sites.map((site) => el("table", { "data-card": site },
    el("caption", {}, site),
    ...Object.entries(cards[site]).map(([key, value]) => el("tr", {}, el("td", { class: "name" }, key), el("td", {}, value)))))));
}

function renderNotes(notes) {
  const box = document.getElementById("notes");
  if (!notes.total) {
    box.replaceChildren(el("p", { class: "muted" }, "No notes: no skipped files, missing sites or uncomputed metrics."));
    return;
  }
  const shown = notes.latest.slice().reverse();
  const caption = notes.total > shown.length ? "latest " + shown.length + " of " + notes.total + " notes, newest first" : "newest first";
  box.replaceChildren(el("div", { class: "footnotes" }, caption), el("table", { id: "notes-table" },
    el("tr", {}, ...["round", "site", "kind", "message"].map((h) => el("th", { class: "name" }, h))),
    ...shown.map((n) => el("tr", { "data-kind": n.kind },
      ...[n.round === null ? "-" : n.round, n.site || "-", n.kind, n.message].map((c) => el("td", { class: "name" }, c))))));
}

// ---- polling ------------------------------------------------------------------------------

async function tick() {
  const live = document.getElementById("live");
  try {
    const data = await getJSON("/api/runs");
    showProblem(data.error);
    renderRuns(data);
    const known = data.runs.map(runKey);
    if (!known.includes(state.selected)) {
      const fromHash = decodeURIComponent(location.hash.slice(1));
      const key = known.includes(fromHash) ? fromHash : defaultRun(data.runs);
      if (key) await select(key); else document.getElementById("run-section").hidden = true;
    } else {
      await refreshRun();
    }
    live.textContent = "updated " + new Date().toLocaleTimeString() + ", every " + state.poll + " s";
    live.className = "";
    requestAnimationFrame(() => setTimeout(loadPlotly, 0)); // after the first paint
  } catch (err) {
    live.textContent = "cannot reach the dashboard server (" + err.message + "); retrying";
    live.className = "stale";
  }
  setTimeout(tick, state.poll * 1000);
}

async function start() {
  try {
    state.poll = (await getJSON("/api/config")).poll_seconds;
  } catch (err) { /* keep the default interval */ }
  tick();
}

start();
