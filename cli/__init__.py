"""The `fedir` command line.

    fedir data synth OUT --sites N --patients P --seed S [--confound STRENGTH] [--masks | --mask-fraction F]
                     [--scanner-change SITE:YYYY-MM-DD] [--grades] [--outcome] [--null-covariate]
    fedir data check SITE_DIR [--card OUT.json] [--k K]
    fedir data import heart --out DIR [--source DIR]
    fedir data import tcga-brca --out DIR [--source DIR]
    fedir data import medmnist NPZ --out DIR --sites K --partition iid|dirichlet:ALPHA
        [--labelled-fraction F] [--seed S] [--marker-site N] [--prevalence-skew S [--skew-site N]]
    fedir simulate SCENARIO.toml --out DIR [--set section.key=value ...]
    fedir compare SCENARIO.toml --out DIR [--seeds 0 1 2] [--arms ARM ...] [--set section.key=value ...]
    fedir nodes RUN_DIR [--run RUN_ID]
    fedir dashboard RUN_DIR [--port P] [--host 127.0.0.1]
    fedir certs init DIR --host NAME [--host NAME ...] [--force]
    fedir certs server DIR --host NAME [--host NAME ...] [--ca-key PATH] [--force]
    fedir certs node DIR SITE [--force]
    fedir guard PORT --allow USER [--allow USER ...] [--remove] [--print]
    fedir proxy DIR --listen ADDR:PORT --superlink 127.0.0.1:PORT --certs CERTS_DIR [--upstream-name NAME] [--user USER]
    fedir site approve APP_DIR [--allow-list FILE] [--note TEXT]
    fedir site approved [--allow-list FILE]
    fedir site supernode [--allow-list FILE] -- FLOWER_SUPERNODE_ARGS...
    fedir site log SITE_DIR [--audit-dir DIR] [--json]

Errors a user can fix (fedir.errors.UserError: a bad scenario or setting, a manifest, a
missing data folder, a study no site could take part in) end with one line on stderr and
exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _scanner_change(text: str) -> tuple[int, str]:
    """`--scanner-change SITE:YYYY-MM-DD` (SITE an index or site-N) -> (index, date)."""
    site, sep, date = text.partition(":")
    site = site.removeprefix("site-")
    if not sep or not site.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not SITE:YYYY-MM-DD (e.g. 1:2022-07-01 or site-1:2022-07-01)")
    return int(site), date


def _synth(args: argparse.Namespace) -> int:
    from fedir.errors import UserError
    from fedir.simulations.synthetic import check_scanner_change, generate_federation

    if args.scanner_change is not None:
        try:
            check_scanner_change(args.scanner_change, args.sites)
        except ValueError as exc:
            raise UserError(f"--scanner-change: {exc}") from None
    info = generate_federation(
        args.out,
        sites=args.sites,
        patients=args.patients,
        seed=args.seed,
        confound=args.confound,
        unlabelled_fraction=args.unlabelled,
        image_size=args.image_size,
        force=args.force,
        mask_fraction=args.mask_fraction if args.mask_fraction is not None else (0.0 if args.masks else None),
        scanner_change=args.scanner_change,
        grades=args.grades,
        outcome=args.outcome,
        null_covariate=args.null_covariate,
    )
    print(f"synthetic federation in {Path(args.out).resolve()}: {len(info.get('sites', []))} sites")
    return 0


def _check(args: argparse.Namespace) -> int:
    from fedir.client.datacheck import run_check

    return run_check(args.site_dir, args.card, k=args.k, val_fraction=args.val_fraction,
                     test_fraction=args.test_fraction, num_classes=args.classes)


def _import(args: argparse.Namespace) -> int:
    from fedir.simulations.uci_heart import import_heart

    counts = import_heart(args.out, args.source)
    for site, n in counts.items():
        print(f"{Path(args.out).resolve() / site}: {n['train']} train, {n['test']} test patients")
    return 0


def _import_tcga_brca(args: argparse.Namespace) -> int:
    from fedir.simulations.tcga_brca import import_tcga_brca

    counts = import_tcga_brca(args.out, args.source)
    for site, n in counts.items():
        print(f"{Path(args.out).resolve() / site}: {n['train']} train, {n['test']} test patients, {n['events']} events")
    return 0


def _import_medmnist(args: argparse.Namespace) -> int:
    from fedir.simulations.medmnist import import_medmnist

    record = import_medmnist(args.npz, args.out, sites=args.sites, partition=args.partition,
                             labelled_fraction=args.labelled_fraction, seed=args.seed,
                             marker_site=args.marker_site, prevalence_skew=args.prevalence_skew,
                             skew_site=args.skew_site)
    for site, counts in record["per_site"].items():
        parts = ", ".join(f"{c['images']} {s} ({c['positives']} positive)" for s, c in counts.items())
        print(f"{Path(args.out).resolve() / site}: {parts}; {counts['train']['labelled']} training labels")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from fedir.server.report.baseline import baseline_text
    from fedir.server.summary import format_site_table, selection_line
    from fedir.simulations.scenario import load_scenario
    from fedir.simulations.simulate import simulate

    settings = load_scenario(args.scenario, args.set)
    out = Path(args.out)
    print(f"fedir: {len(settings.sites)} sites, {settings.train_rounds} rounds -> {out.resolve()}")
    print("starting Flower's simulation engine (Ray); the first round also decodes each site's images",
          flush=True)
    summary = simulate(settings, out, scenario=str(args.scenario), verbose=args.verbose)
    print()
    print(format_site_table(summary))
    print(selection_line(summary))
    if baseline_text(summary):
        print("\n" + baseline_text(summary))
    print(f"\nreport: {(out / 'report.html').resolve()}")
    print(f"summary: {(out / 'summary.json').resolve()}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    import logging

    from fedir.simulations.compare import ARMS, compare, markdown
    from fedir.simulations.scenario import load_scenario

    logging.getLogger("flwr").setLevel(logging.WARNING)  # every arm's rounds, in one process

    settings = load_scenario(args.scenario, args.set)
    out = Path(args.out)
    arms = args.arms or list(ARMS)
    print(f"fedir compare: {len(arms)} arms x {len(args.seeds)} seed(s), {len(settings.sites)} sites, "
          f"{settings.train_rounds} rounds each -> {out.resolve()}", flush=True)
    result = compare(settings, out, args.seeds, arms, progress=lambda line: print(line, flush=True))
    print("\n" + markdown(result))
    print(f"\ntable: {(out / 'compare.md').resolve()}")
    return 0


def _nodes(args: argparse.Namespace) -> int:
    from fedir.errors import UserError
    from fedir.server.runreader import ReadOnlyRunStore, StoreUnreadable

    try:
        store = ReadOnlyRunStore(Path(args.run_dir) / "runs.sqlite")
    except StoreUnreadable as exc:
        raise UserError(str(exc)) from None
    run_id = args.run or store.latest_run_id()
    if run_id is None:
        raise UserError(f"{args.run_dir}/runs.sqlite holds no run yet")
    rows = store.nodes(run_id)
    print(f"run {run_id}: the Flower node id of each site (what `flwr supernode ls` lists)")
    print(f"{'site':24s} {'node id':>22s}  rounds")
    for row in rows:
        print(f"{row['site']:24s} {row['node_id']:>22d}  {row['first_round']}-{row['last_round']}")
    if not rows:
        print("(no site has trained in this run yet)")
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    from fedir.server.dashboard import serve

    serve(args.run_dir, host=args.host, port=args.port)
    return 0


def _certs(args: argparse.Namespace) -> int:
    from fedir.certs import init_ca, issue_server_cert, node_keys

    if args.certs_command == "init":
        paths = init_ca(args.dir, args.host, force=args.force)
    elif args.certs_command == "server":
        paths = issue_server_cert(args.dir, args.host, force=args.force, ca_key_path=args.ca_key)
    else:
        paths = node_keys(args.dir, args.site, force=args.force)
    for path in paths.values():
        print(path)
    return 0


def _guard(args: argparse.Namespace) -> int:
    from fedir.server.local_guard import apply, guard_commands, unguard_commands

    commands = unguard_commands(args.port) if args.remove else guard_commands(args.port, args.allow)
    if args.print:
        for command in commands:
            print(" ".join(command))
        return 0
    apply(commands)
    what = "removed the rules for" if args.remove else f"only {', '.join(args.allow)} may now reach"
    print(f"fedir guard: {what} 127.0.0.1:{args.port}")
    return 0


def _proxy(args: argparse.Namespace) -> int:
    from fedir.server.fleet_proxy import write_nginx_config

    conf = write_nginx_config(args.dir, args.listen, args.superlink, args.certs,
                              upstream_name=args.upstream_name, user=args.user)
    print(conf.resolve())
    print(f"start: nginx -p {Path(args.dir).resolve()} -c {conf.resolve()} -e {Path(args.dir).resolve()}/error.log")
    return 0


def _site(args: argparse.Namespace) -> int:
    from fedir.client.approval import approve, read_allow_list

    if args.site_command == "approve":
        approval, added = approve(args.app_dir, args.allow_list, note=args.note)
        verb = "approved" if added else f"already approved {approval.approved_at}:"
        print(f"{verb} {approval.app} sha256 {approval.sha256} in {Path(args.allow_list).resolve()}")
    elif args.site_command == "approved":
        for a in read_allow_list(args.allow_list):
            print(f"{a.sha256}  {a.app}  {a.approved_at}  {a.source}" + (f"  ({a.note})" if a.note else ""))
    else:
        from fedir.client.app_gate import run_supernode

        run_supernode(args.allow_list, args.flower_args[1:] if args.flower_args[:1] == ["--"] else args.flower_args)
    return 0


def _site_log(args: argparse.Namespace) -> int:
    import json

    from fedir.client.audit_log import AUDIT_DIR, format_entry, read_log

    folder = args.audit_dir or args.site_dir / AUDIT_DIR
    if not folder.is_dir():
        print(f"fedir: error: no audit log in {folder.resolve()}", file=sys.stderr)
        return 2
    for entry in read_log(folder):
        print(json.dumps(entry, sort_keys=True) if args.json else format_entry(entry))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedir", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="prepare site data").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write a synthetic X-ray angiography DICOM federation")
    synth.add_argument("out", type=Path, help="folder to write site-0 ... site-N-1 into")
    synth.add_argument("--sites", type=int, default=4)
    synth.add_argument("--patients", type=int, default=80, help="patients per site")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--confound", type=float, default=0.0,
                       help="0 = same prevalence everywhere, 1 = positives almost all from site-0")
    synth.add_argument("--unlabelled", type=float, default=0.7,
                       help="fraction of training-split patients without a label")
    synth.add_argument("--image-size", type=int, default=256)
    synth.add_argument("--masks", action="store_true",
                       help="write vessel/stenosis masks (DICOM SEG + PNG), one outlined frame per image")
    synth.add_argument("--mask-fraction", type=float, default=None, metavar="F",
                       help="write masks for this share of each image's frames (at least one; implies --masks)")
    synth.add_argument("--scanner-change", type=_scanner_change, default=None, metavar="SITE:YYYY-MM-DD",
                       help="from this date on, the site's images come from a noisier, lower-contrast detector "
                            "(every row's acquired column dates it; the drift check has something to find)")
    synth.add_argument("--grades", action="store_true",
                       help="label = stenosis grade: 0 none, 1 moderate, 2 severe (a task.classes = 3 study)")
    synth.add_argument("--outcome", action="store_true",
                       help="also write each patient's time to event (days) and event (0/1), driven by the "
                            "stenosis burden, age and sex and censored at the site's data cut-off "
                            "(a task.kind = survival study)")
    synth.add_argument("--null-covariate", action="store_true",
                       help="add clin_null, a clinical column drawn apart from the label (a fused model's "
                            "sensitivity analysis then has an input known to carry nothing)")
    synth.add_argument("--force", action="store_true", help="regenerate even if cached")
    synth.set_defaults(func=_synth)

    check = data.add_parser("check", help="read every image of a site; print what loads and why not")
    check.add_argument("site_dir", type=Path, help="site folder with manifest.csv")
    check.add_argument("--card", type=Path, help="write the site's data card (JSON) here")
    check.add_argument("--k", type=int, default=5, help="suppress data-card cells below k patients")
    check.add_argument("--classes", type=int, default=2,
                       help="the study's task.classes: labels must be 0..classes-1")
    check.add_argument("--val-fraction", type=float, default=0.15)
    check.add_argument("--test-fraction", type=float, default=0.25)
    check.set_defaults(func=_check)

    imp = data.add_parser("import", help="turn a public data set into site folders")
    imp_sub = imp.add_subparsers(dest="dataset", required=True)
    heart = imp_sub.add_parser("heart", help="UCI Heart Disease, four hospitals (FLamby)")
    heart.add_argument("--out", type=Path, required=True, help="folder to write one site folder per hospital into")
    heart.add_argument("--source", type=Path, default=None,
                       help="raw files (default: $FEDIR_DATA/uci_heart_disease or ../shared/data/uci_heart_disease)")
    heart.set_defaults(func=_import)
    brca = imp_sub.add_parser("tcga-brca", help="FLamby's Fed-TCGA-BRCA, six regions, survival (task.kind = survival)")
    brca.add_argument("--out", type=Path, required=True, help="folder to write one site folder per region into")
    brca.add_argument("--source", type=Path, default=None,
                      help="raw files (default: $FEDIR_DATA/fed_tcga_brca or ../shared/data/fed_tcga_brca)")
    brca.set_defaults(func=_import_tcga_brca)
    med = imp_sub.add_parser("medmnist", help="a MedMNIST .npz file cut into K sites (simulations/medmnist.py)")
    med.add_argument("npz", type=Path, help="a MedMNIST .npz (train/val/test images and labels)")
    med.add_argument("--out", type=Path, required=True, help="folder to write site-0 ... site-K-1 into")
    med.add_argument("--sites", type=int, required=True)
    med.add_argument("--partition", default="iid", help="iid | dirichlet:ALPHA (label skew; small = strong)")
    med.add_argument("--labelled-fraction", type=float, default=1.0,
                     help="share of each site's training images that keep their label")
    med.add_argument("--seed", type=int, default=0)
    med.add_argument("--marker-site", type=int, default=None,
                     help="burn a bright corner square into every image of this site")
    med.add_argument("--prevalence-skew", type=float, default=0.0,
                     help="drop this share of --skew-site's negatives, raising its prevalence")
    med.add_argument("--skew-site", type=int, default=0, help="the site --prevalence-skew applies to")
    med.set_defaults(func=_import_medmnist)

    sim = sub.add_parser("simulate", help="run a scenario on Flower's simulation engine")
    sim.add_argument("scenario", type=Path)
    sim.add_argument("--out", type=Path, required=True, help="run folder (summary.json, runs.sqlite, report.html)")
    sim.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a scenario setting (repeatable)")
    sim.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    sim.set_defaults(func=_simulate)

    cmp = sub.add_parser("compare", help="simulation: the scenario against each site alone, supervised, "
                         "all labels, pooled, clinical and radiomics, paired per seed")
    cmp.add_argument("scenario", type=Path)
    cmp.add_argument("--out", type=Path, required=True, help="folder for every arm's run and compare.json/.md")
    cmp.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    cmp.add_argument("--arms", nargs="+", default=None,
                     help="federated supervised all_labels local pooled clinical radiomics (default: all)")
    cmp.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a scenario setting (repeatable)")
    cmp.set_defaults(func=_compare)

    nodes = sub.add_parser("nodes", help="which Flower node id answered as which site (`flwr supernode ls` "
                           "shows node ids only)")
    nodes.add_argument("run_dir", type=Path, help="the study's output.dir (its runs.sqlite)")
    nodes.add_argument("--run", default=None, help="a run id (default: the latest run in the folder)")
    nodes.set_defaults(func=_nodes)

    dash = sub.add_parser("dashboard", help="watch runs in a local web page while they are written")
    dash.add_argument("run_dir", type=Path, help="a run folder (runs.sqlite) or a folder of run folders")
    dash.add_argument("--port", type=int, default=8050, help="0 picks a free port")
    dash.add_argument("--host", default="127.0.0.1",
                      help="address to listen on; the default keeps the page on this machine")
    dash.set_defaults(func=_dashboard)

    certs = sub.add_parser("certs", help="TLS certificates and SuperNode keys for a deployment (DEPLOY.md)")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True)
    init = certs_sub.add_parser("init", help="a CA and the SuperLink's server certificate")
    init.add_argument("dir", type=Path)
    server = certs_sub.add_parser("server", help="re-issue the SuperLink's certificate from the existing CA "
                                  "(new names, e.g. the front door's address; renewal): every ca.crt stays valid")
    server.add_argument("dir", type=Path)
    server.add_argument("--ca-key", type=Path, default=None,
                        help="the CA's key, when it was moved offline (default DIR/ca-private/ca.key)")
    for p in (init, server):
        p.add_argument("--host", action="append", required=True,
                       help="a name or IP address the sites dial, the front door's included (repeatable)")
    node = certs_sub.add_parser("node", help="a SuperNode's key pair (OpenSSH EC) for node authentication")
    node.add_argument("dir", type=Path)
    node.add_argument("site")
    for p in (init, server, node):
        p.add_argument("--force", action="store_true", help="replace existing files")
        p.set_defaults(func=_certs)

    guard = sub.add_parser("guard", help="firewall: only the listed local accounts may reach the SuperLink's "
                           "loopback port (its Control API included; DEPLOY.md, step 3)")
    guard.add_argument("port", type=int, help="the SuperLink's --port")
    guard.add_argument("--allow", action="append", default=[], metavar="USER",
                       help="a local account that may connect: the operator's, the SuperLink's, nginx's (repeatable)")
    guard.add_argument("--remove", action="store_true", help="take the rules away again")
    guard.add_argument("--print", action="store_true", help="print the iptables commands instead of running them")
    guard.set_defaults(func=_guard)

    proxy = sub.add_parser("proxy", help="nginx config: hospitals reach only the SuperLink's Fleet API (DEPLOY.md)")
    proxy.add_argument("dir", type=Path, help="folder for nginx.conf, its logs and temporary files")
    proxy.add_argument("--listen", required=True, help="address:port the hospitals dial, e.g. 0.0.0.0:443")
    proxy.add_argument("--superlink", default="127.0.0.1:8000",
                       help="the SuperLink's --host:--port, on the coordinator's loopback")
    proxy.add_argument("--certs", type=Path, required=True, help="the folder `fedir certs init` wrote")
    proxy.add_argument("--upstream-name", default="localhost",
                       help="a DNS name on server.crt that nginx checks when it dials the SuperLink")
    proxy.add_argument("--user", default=None, help="user nginx's workers run as (nginx started as root)")
    proxy.set_defaults(func=_proxy)

    site = sub.add_parser("site", help="a hospital's own controls (DEPLOY.md)")
    site_sub = site.add_subparsers(dest="site_command", required=True)
    approve = site_sub.add_parser("approve", help="approve the exact app bundle `flwr run APP_DIR` submits")
    approve.add_argument("app_dir", type=Path, help="the reviewed copy of the app (its pyproject.toml folder)")
    approve.add_argument("--note", default="", help="why, or who reviewed it")
    approved = site_sub.add_parser("approved", help="list the approved app bundles")
    gate = site_sub.add_parser("supernode", help="Flower's flower-supernode, running only approved apps")
    gate.add_argument("flower_args", nargs=argparse.REMAINDER, help="-- then flower-supernode's options")
    for p in (approve, approved, gate):
        p.add_argument("--allow-list", type=Path, default=Path("approved-apps.json"),
                       help="the site's allow-list (JSON; default ./approved-apps.json)")
        p.set_defaults(func=_site)
    log = site_sub.add_parser("log", help="print the site's audit log: every message received and sent")
    log.add_argument("site_dir", type=Path, help="the site folder (its log is SITE_DIR/.fedir-audit/)")
    log.add_argument("--audit-dir", type=Path, help="the folder given as node config audit-dir instead")
    log.add_argument("--json", action="store_true", help="one JSON object per line, as stored")
    log.set_defaults(func=_site_log)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a user error (fedir.errors.UserError) is one line on stderr and exit 2."""
    from fedir.errors import UserError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"fedir: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(exc: Exception) -> str:
    """The error's message on one line (a site's reason may carry line breaks)."""
    return " ".join(str(exc).split())
