"""Where a deployment round's time goes, over TLS on loopback, with and without SecAgg+.

Issue 15 found a logistic-model round over TLS taking 42-87 s while each site handled each
message in under a second. This runs a real deployment on 127.0.0.1: a TLS SuperLink with
registered-node authentication, one SuperNode per UCI heart centre (four hospitals, their
site folders in node config), and `flwr run` of this project twice, the same study with
`privacy.secure-aggregation` off and "secagg+" (logistic model, `--rounds` rounds). The
time split comes from the sites' own audit logs (fedir.client.audit_log, stamped to the
millisecond): a message is *handled* from its "received" entry to its reply's "sent"
entry, inside the ClientApp process; a round *spans* from the end of the previous round
to the last site's evaluate reply of this one (see split_time); the rest of the span is Flower's
delivery, the fresh ClientApp process each message starts (Python, torch, flwr and fedir
imports: benchmarks/message_import.py) and the coordinator's own work. Result:
`results/tls_rounds.json`; the ratio is SecAgg+ over plain, same machine, same run.

    python benchmarks/tls_rounds.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the deployment harness the tests use

from flower_deployment import (  # noqa: E402
    CONNECTION,
    Processes,
    flwr,
    flwr_env,
    free_port,
    started_run,
    superlink_args,
    supernode_args,
    wait_for_file,
    wait_for_port,
    write_flower_config,
)
from machine import describe  # noqa: E402  (benchmarks/ is on sys.path)

from fedir.certs import init_ca, node_keys  # noqa: E402
from fedir.client.audit_log import AUDIT_DIR, read_log  # noqa: E402
from fedir.simulations.uci_heart import CENTRES, import_heart  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "tls_rounds.json"


def _t(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def split_time(sites: dict[str, Path], run_id: int) -> dict:
    """The sites' handling time and each round's span, from the audit logs of run `run_id`.

    A round ends when the last site sends its evaluate reply of that round (every arm
    evaluates every round, and evaluate messages carry the round; SecAgg+'s legacy train
    stages do not), and starts where the previous one ended (round 1: when the first site
    received the run's first message, the feature query included)."""
    handled: list[float] = []
    by_site: dict[str, float] = {}
    first = float("inf")
    ends: dict[int, float] = {}
    messages = 0
    for site, site_dir in sites.items():
        entries = [e for e in read_log(site_dir / AUDIT_DIR) if e["run"] == run_id]
        received = {e["message_id"]: e for e in entries if e["direction"] == "received"}
        first = min([first, *(_t(e["time"]) for e in received.values())])
        for sent in (e for e in entries if e["direction"] == "sent"):
            got = received.get(sent["reply_to"])
            if got is None:
                continue
            messages += 1
            handled.append(_t(sent["time"]) - _t(got["time"]))
            by_site[site] = by_site.get(site, 0.0) + handled[-1]
            if got["message_type"].startswith("evaluate") and got["round"] is not None:
                ends[int(got["round"])] = max(ends.get(int(got["round"]), float("-inf")), _t(sent["time"]))
    starts = [first, *[ends[r] for r in sorted(ends)][:-1]]
    spans = {r: ends[r] - start for r, start in zip(sorted(ends), starts)}
    return {"messages": messages, "handled_s_median": round(statistics.median(handled), 3),
            "handled_s_max": round(max(handled), 3), "handled_s_total": round(sum(handled), 2),
            "round_span_s": {str(r): round(v, 2) for r, v in spans.items()},
            "round_span_s_median": round(statistics.median(spans.values()), 2),
            # the share of the rounds' time a site spends handling messages (mean over sites)
            "handled_share_of_spans": round(statistics.fmean(by_site.values()) / max(sum(spans.values()), 1e-9), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fedir-tls-"))
    sites = {c: tmp / "heart" / c for c in CENTRES}
    import_heart(tmp / "heart")
    certs = tmp / "certs"
    init_ca(certs, ["127.0.0.1", "localhost"])
    for site in sites:
        node_keys(certs, site)
    port = free_port()
    home = tmp / "flwr-home"
    write_flower_config(home, port, certs / "ca.crt")
    env = flwr_env(home)
    procs = Processes(tmp)
    result: dict = {"machine": describe(shared_machine=True), "rounds": args.rounds, "sites": list(sites),
                    "model": "logreg (UCI heart, 13 features)", "arms": {}}
    try:
        superlink = procs.start("superlink", superlink_args(certs, port, tmp / "superlink.db"), env, tmp)
        wait_for_port(port, superlink, procs.log("superlink"))
        for site in sites:
            reg = flwr(["supernode", "register", str(certs / "nodes" / f"{site}.pub"), CONNECTION, "--name", site],
                       env, tmp)
            assert reg.returncode == 0, reg.stdout + reg.stderr
        for site, site_dir in sites.items():
            procs.start(site, supernode_args(certs, port, certs / "nodes" / f"{site}.key", site_dir, free_port()),
                        env, tmp)
        for arm, extra in (("plain", ""), ("secagg+", ' privacy.secure-aggregation="secagg+"')):
            out = tmp / f"run-{arm}"
            config = (f'federation.sites="{";".join(sites)}" model.name="logreg" train.rounds={args.rounds} '
                      f'eval.bootstrap=100 output.dir="{out}"{extra}')
            started = time.monotonic()
            run = flwr(["run", ".", CONNECTION, "--run-config", config], env, ROOT)
            assert run.returncode == 0, run.stdout + run.stderr
            run_id = started_run(run)
            wait_for_file(out / "summary.json", run_id, env, ROOT)
            wall = time.monotonic() - started
            result["arms"][arm] = {"study_wall_s": round(wall, 1), **split_time(sites, run_id)}
            print(arm, json.dumps(result["arms"][arm]), flush=True)
    finally:
        procs.stop_all()
    plain, secagg = result["arms"]["plain"], result["arms"]["secagg+"]
    result["ratio_round_span_median"] = round(secagg["round_span_s_median"] / plain["round_span_s_median"], 2)
    result["ratio_study_wall"] = round(secagg["study_wall_s"] / plain["study_wall_s"], 2)
    result["machine"]["loadavg_end"] = describe(with_torch=False)["loadavg"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k.startswith("ratio")}))


if __name__ == "__main__":
    main()
