"""Re-judge the committed bias benchmarks' federations under bias.secondary-to-alarm = 0 and 2.

A re-analysis, not a re-run: no model is trained and no signal is recomputed. Every stored
federation's verdict (benchmarks/results: the calibration runs, the stability runs' final
verdicts, the segmentation and survival-imaging verdicts) lists the signals that fired, with
the thresholds of its run; this script feeds those fired signals to the current
`fedir.strategies.bias.verdict` with each rule and counts the alarms (and how often each
signal fired) per file and per condition and strength. Under 2 (the rule the runs were judged by) it must reproduce every
stored alarm; a federation where it does not is listed under `not_reproduced`.

    python benchmarks/bias_reverdict.py   # writes benchmarks/results/bias_reverdict.json
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from bias_calibration import code_version  # benchmarks/ is on sys.path

from fedir.strategies.bias import PRIMARY, verdict

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "bias_reverdict.json"
RULES = (0, 2)
CALIBRATION = ("bias_calibration.json", "bias_calibration_synthetic.json", "bias_calibration_synthetic_v5.json")
STABILITY = ("bias_stability.json", "bias_stability_v5.json")
SEGMENTATION = ("segmentation_bias.json", "segmentation_bias_k5.json", "segmentation_cross_site.json")
SURVIVAL = ("survival_imaging.json", "survival_imaging_15rounds.json")
TCGA = ("tcga_brca.json",)
# tcga_brca.json's runs store the verdict's reasons and warnings, not signal names: each
# reason's opening words name its test (fedir.strategies.survival_bias, heterogeneity, bias)
REASON_SIGNALS = (("follow-up (censoring) differs by site", "follow_up_by_site"),
                  ("survival differs by site", "survival_by_site"),
                  ("site C-indices differ beyond sampling error", "c_index_heterogeneity"),
                  ("the model ranks patients across sites better than within them", "pooled_vs_stratified_c"))


def judge(signals: list[str], secondary_to_alarm: int) -> bool:
    """The current verdict on a federation whose fired signals were `signals`."""
    tests = {name: {"alarm": True, "reason": name} for name in signals}
    return bool(verdict(tests, secondary_to_alarm)["alarm"])


def calibration(data: dict) -> Iterator[tuple[dict, list[str], bool]]:
    """(cell, fired signals, stored alarm) of every federation of a calibration file: the
    tuning federations, the reported ones and Heart Disease."""
    for run in data.get("tuning", []):
        yield {"role": "tuning", "family": "pneumoniamnist", "condition": "clean", "strength": 0.0}, \
            run["signals"], run["alarm"]
    for run in data["federations"]:
        cell = {k: run[k] for k in ("role", "family", "condition", "strength")}
        yield cell, run["verdict"]["signals"], run["verdict"]["alarm"]
    if data.get("heart"):
        yield {"role": "real", "family": "heart", "condition": "four hospitals", "strength": None}, \
            data["heart"]["signals"], data["heart"]["alarm"]


def stability(data: dict) -> Iterator[tuple[dict, list[str], bool]]:
    """Each federation's final verdict (the last entry of its rounds)."""
    for run in data["federations"]:
        final = run["rounds"][-1]
        role = "clean" if run["confound"] == 0 else "confounded"
        yield {"role": role, "family": "synthetic", "condition": "confound", "strength": run["confound"]}, \
            final["signals"], final["alarm"]


def segmentation(data: dict) -> Iterator[tuple[dict, list[str], bool]]:
    for run in data["runs"]:
        role = "clean" if run["confound"] == 0 else "confounded"
        yield {"role": role, "family": "synthetic segmentation", "condition": "confound",
               "strength": run["confound"]}, run["signals"], run["alarm"]


def survival(data: dict) -> Iterator[tuple[dict, list[str], bool]]:
    for arm, result in data["arms"].items():
        yield {"role": "survival", "family": "synthetic survival", "condition": f"{arm} arm", "strength": None}, \
            result["bias"]["signals"], result["bias"]["alarm"]


def signal_of(reason: str) -> str:
    """The test a stored reason or warning came from; an unknown text stops the script."""
    for opening, signal in REASON_SIGNALS:
        if reason.startswith(opening):
            return signal
    raise ValueError(f"no test known for the stored reason {reason[:80]!r}: add it to REASON_SIGNALS")


def tcga(data: dict) -> Iterator[tuple[dict, list[str], bool]]:
    """Every Fed-TCGA-BRCA run (protocol x arm x seed): a real federation, no known truth."""
    for protocol, arms in data["protocols"].items():
        for arm, result in arms.items():
            for run in result.get("runs", []):
                if "bias_alarm" not in run:  # lifelines' pooled fits and other arms with no ServerApp verdict
                    continue
                signals = [signal_of(r) for r in run["bias_reasons"] + run["bias_warnings"]]
                yield {"role": "real", "family": "Fed-TCGA-BRCA", "condition": f"{protocol} {arm}",
                       "strength": None}, signals, run["bias_alarm"]


def changes(alarms: list[bool]) -> int:
    return sum(a != b for a, b in zip(alarms, alarms[1:]))


def stability_changes(data: dict, last: int) -> dict:
    """Under each rule, the most changes of any federation's verdict over its last `last`
    entries (the stability target allows one), per confound strength."""
    out: dict[str, dict[str, int]] = {}
    for run in data["federations"]:
        for k in RULES:
            alarms = [judge(r["signals"], k) for r in run["rounds"]][-last:]
            cell = out.setdefault(str(k), {})
            cell[str(run["confound"])] = max(cell.get(str(run["confound"]), 0), changes(alarms))
    return out


def reverdict(name: str, rows: Iterator[tuple[dict, list[str], bool]]) -> dict:
    cells: dict[str, dict] = {}
    not_reproduced = []
    for cell, signals, stored in rows:
        key = " | ".join(str(cell[k]) for k in ("role", "family", "condition", "strength"))
        entry = cells.setdefault(key, {**cell, "n": 0, "stored_alarms": 0, "primary_fired": 0,
                                       "alarms": {str(k): 0 for k in RULES}, "fired": {}})
        entry["n"] += 1
        for signal in signals:
            entry["fired"][signal] = entry["fired"].get(signal, 0) + 1
        entry["stored_alarms"] += bool(stored)
        entry["primary_fired"] += any(s in PRIMARY for s in signals)
        for k in RULES:
            entry["alarms"][str(k)] += judge(signals, k)
        if judge(signals, 2) != bool(stored):
            not_reproduced.append({**cell, "signals": signals, "stored_alarm": stored})
    for entry in cells.values():
        entry["alarm_rate"] = {k: count / entry["n"] for k, count in entry["alarms"].items()}
    clean = [e for e in cells.values() if e["role"] == "clean"]
    n_clean = sum(e["n"] for e in clean)
    return {
        "file": f"benchmarks/results/{name}",
        "cells": list(cells.values()),
        "clean": {"n": n_clean, "false_alarms": {str(k): sum(e["alarms"][str(k)] for e in clean) for k in RULES},
                  "false_alarm_rate": {str(k): sum(e["alarms"][str(k)] for e in clean) / n_clean if n_clean else None
                                       for k in RULES}},
        "not_reproduced": not_reproduced,
    }


def main() -> None:
    files = {}
    for kind, names, read in (("calibration", CALIBRATION, calibration), ("stability", STABILITY, stability),
                              ("segmentation", SEGMENTATION, segmentation), ("survival", SURVIVAL, survival),
                              ("survival", TCGA, tcga)):
        for name in names:
            data = json.loads((RESULTS / name).read_text())
            files[name] = {"kind": kind, **reverdict(name, read(data))}
            if kind == "stability":
                files[name]["max_changes_last_3"] = stability_changes(data, 3)
    result = {
        "what": "each stored federation's fired signals judged again by fedir.strategies.bias.verdict with "
                "bias.secondary-to-alarm = 0 and = 2; thresholds as stored, no model retrained, no signal "
                "recomputed; calibration files: every federation's final-round verdict; stability files: each "
                "federation's final verdict (max_changes_last_3 over its last 3 entries); tcga_brca.json: each "
                "run's signals read from its stored reasons and warnings (REASON_SIGNALS)",
        "rules": list(RULES),
        "code": code_version(),
        "files": files,
        "all_reproduced_at_2": not any(f["not_reproduced"] for f in files.values()),
    }
    OUT.write_text(json.dumps(result, indent=1))
    print(markdown(files))
    print("every stored alarm reproduced under 2:", result["all_reproduced_at_2"])


def markdown(files: dict) -> str:
    """The table of benchmarks/README.md: per file and cell, alarms under 0 and under 2."""
    lines = ["| file | federation | n | primary fired | alarms, 2 (as stored) | alarms, 0 (default) |",
             "|---|---|---|---|---|---|"]
    for name, f in files.items():
        for e in f["cells"]:
            strength = "" if e["strength"] is None else f" {e['strength']}"
            lines.append(f"| {name} | {e['role']}: {e['family']} {e['condition']}{strength} | {e['n']} | "
                         f"{e['primary_fired']} | {e['alarms']['2']} | {e['alarms']['0']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
