"""The ``sci-node`` command line: parse, configure, call the API, map errors to exit codes.

Nothing here does real work: each subcommand imports its module lazily (so ``--help``
and ``status`` stay fast and do not import torch) and calls one API function.
Library errors (:class:`~sci_node.errors.SciNodeError`) become one clear line on
stderr and a non-zero exit code; nothing else is caught.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypedDict

from sci_node import __version__
from sci_node.config import NodeConfig, load_config
from sci_node.errors import SciNodeError
from sci_node.logs import configure_logging
from sci_node.store.private_files import restrict_umask
from sci_node.terminal import echo

Handler = Callable[[argparse.Namespace, NodeConfig], int]
#: Entry-point group through which installed packages add ``sci-node`` subcommands (setup.cfg: the
#: trainer registers ``train``), so the dependency runs one way: the trainer imports the node.
COMMANDS_GROUP = "sci_node.commands"
#: commands that write (or create) the data dir: run with umask 077, so all they create is 0700 / 0600
PRIVATE_COMMANDS = frozenset({"serve", "worker", "status", "jobs", "corrections", "stack", "demo"})


def _add_config_flags(p: argparse.ArgumentParser, node_flags: bool = False) -> None:
    p.add_argument("--config", type=Path, help="TOML configuration file (flags override it)")
    p.add_argument("--data-dir", type=Path, help="spool, index and results directory")
    p.add_argument("--models-dir", type=Path, help="model registry directory (default: the repo's models/)")
    p.add_argument("--log-format", choices=["auto", "json", "console"], help="log rendering")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level")
    if node_flags:
        p.add_argument("--ae-title", help="our AE title (default SCINODE)")
        p.add_argument("--port", type=int, help="DICOM listening port (default 11112)")
        p.add_argument("--bind", help="listening address (default 127.0.0.1)")
        p.add_argument("--destination", action="append", nargs="+", metavar="AET@HOST:PORT",
                       help="where results are sent (AET@HOST:PORT or AET@HOST PORT); repeat for several")
        p.add_argument("--allow-ae", action="append", metavar="AET[@HOST]",
                       help="calling AE allowed to associate; repeat for several (none: accept any)")
        p.add_argument("--stable-seconds", type=float,
                       help="seconds without a new instance before a series is complete")
        p.add_argument("--workers", type=int, help="number of processing workers")
        p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="inference device")
        p.add_argument("--torch-threads", dest="torch_threads", type=int,
                       help="torch threads for inference (default 0 = CPUs minus one, shared by the workers)")
        p.add_argument("--followup-pacs", metavar="AET@HOST:PORT",
                       help="PACS asked (C-FIND, C-GET) for a prior when the job history has none ([followup] pacs)")
        _add_tls_flags(p)
        _add_engine_flags(p)


def _add_tls_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", type=Path, metavar="FILE", help="DICOM TLS on: our certificate ([tls] cert_file)")
    p.add_argument("--tls-key", type=Path, metavar="FILE", help="our private key ([tls] key_file)")
    p.add_argument("--tls-ca", type=Path, metavar="FILE", help="certificates that verify peers ([tls] ca_file)")
    p.add_argument("--tls-require-client-cert", action="store_true", default=None,
                   help="verify client certificates against --tls-ca ([tls] require_client_cert)")


def _add_engine_flags(p: argparse.ArgumentParser, worker: bool = False) -> None:
    if not worker:
        p.add_argument("--engine", choices=["local", "celery"],
                       help="local: models run in this process (default); celery: dispatch to `sci-node worker`s")
    p.add_argument("--broker", metavar="URL", help="Celery broker, e.g. redis://127.0.0.1:6379/0 ([engine] broker_url)")
    p.add_argument("--store", metavar="URL", help="Redis for payloads and results (default: the broker if Redis)")
    p.add_argument("--queue", help="the queue jobs go to / this worker consumes (default cpu; GPU workers: gpu)")


def _engine_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"kind": getattr(args, "engine", None), "broker_url": getattr(args, "broker", None),
            "store_url": getattr(args, "store", None), "queue": getattr(args, "queue", None),
            "concurrency": getattr(args, "concurrency", None)}


def _tls_overrides(args: argparse.Namespace) -> dict[str, Any]:
    cert = getattr(args, "tls_cert", None)
    return {"enabled": True if cert else None, "cert_file": cert, "key_file": getattr(args, "tls_key", None),
            "ca_file": getattr(args, "tls_ca", None),
            "require_client_cert": getattr(args, "tls_require_client_cert", None)}


def _stack_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"scanners": getattr(args, "scanner", None), "dicom_bind": getattr(args, "dicom_bind", None)}


def _config_from_args(args: argparse.Namespace) -> NodeConfig:
    overrides: dict[str, Any] = {
        "data_dir": getattr(args, "data_dir", None),
        "models_dir": getattr(args, "models_dir", None),
        "log_format": getattr(args, "log_format", None),
        "log_level": getattr(args, "log_level", None),
        "ae_title": getattr(args, "ae_title", None),
        "port": getattr(args, "port", None),
        "bind": getattr(args, "bind", None),
        "destinations": _destination_texts(getattr(args, "destination", None)),
        "allowed_aes": getattr(args, "allow_ae", None),
        "stable_seconds": getattr(args, "stable_seconds", None),
        "workers": getattr(args, "workers", None),
        "device": getattr(args, "device", None),
        "torch_threads": getattr(args, "torch_threads", None),
        "engine": _engine_overrides(args),
        "tls": _tls_overrides(args),
        "stack": _stack_overrides(args),
        "followup": {"pacs": getattr(args, "followup_pacs", None)},
    }
    return load_config(getattr(args, "config", None), overrides)


def _destination_texts(groups: list[list[str]] | None) -> list[str] | None:
    """``--destination`` values as ``AET@HOST:PORT`` strings; a bare port joins the token before it
    (so ``--destination DEST@127.0.0.1 11113`` works as well as ``DEST@127.0.0.1:11113``)."""
    if not groups:
        return None
    out: list[str] = []
    for token in (t for g in groups for t in g):
        if token.isdigit() and out and "@" in out[-1] and ":" not in out[-1].split("@", 1)[1] \
                and " " not in out[-1]:
            out[-1] = f"{out[-1]} {token}"
        else:
            out.append(token)
    return out


# -- handlers: each one lazy-imports its module and calls one function ----------------------

def _serve(args: argparse.Namespace, cfg: NodeConfig) -> int:
    from sci_node.app.node import run_node

    return run_node(cfg)


def _worker(args: argparse.Namespace, cfg: NodeConfig) -> int:
    from sci_node.engine.remote import run_worker

    return run_worker(cfg, name=args.name)


def _status(args: argparse.Namespace, cfg: NodeConfig) -> int:
    from sci_node.cli.admin import print_status

    return print_status(cfg, as_json=args.json)


def _jobs(args: argparse.Namespace, cfg: NodeConfig) -> int:
    from sci_node.cli import admin

    if args.jobs_cmd == "show":
        return admin.show_job(cfg, args.job_id, as_json=args.json)
    if args.jobs_cmd == "retry":
        return admin.retry_job(cfg, args.job_id)
    return admin.list_jobs(cfg, limit=args.limit, state=args.state, as_json=args.json)


def _echo(args: argparse.Namespace, cfg: NodeConfig) -> int:
    from sci_node.config import parse_destination
    from sci_node.dicom.scu import echo

    return echo(parse_destination(" ".join(args.target)), calling_ae=args.calling_ae, tls=cfg.tls)


def _send(args: argparse.Namespace, cfg: NodeConfig) -> int:
    from sci_node.config import parse_destination
    from sci_node.dicom.scu import send_path

    return send_path(args.path, parse_destination(" ".join(args.target)), calling_ae=args.calling_ae, tls=cfg.tls)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector over a one-shot command's start-up (imports, model loading).

    Those allocate millions of long-lived objects and free almost none, so every collection the
    allocations trigger is wasted: 0.44 s of CPU of a one-series ``sci-node infer`` (user time
    4.91 -> 4.47 s, wall median 5.80 -> 5.48 s, 5 interleaved runs each, load 3.9). What the
    start-up built is then frozen (:func:`gc.freeze`: never scanned again) and collection resumes
    for the series themselves.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def _infer(args: argparse.Namespace, cfg: NodeConfig) -> int:
    with _gc_paused():
        from sci_node.pipeline.batch import run_batch, start_batch

        started = start_batch(args.input, cfg, device=args.device or cfg.device)
    return run_batch(args.input, args.out, cfg, started=started)


def _compare(args: argparse.Namespace, cfg: NodeConfig) -> int:
    from sci_node.pipeline.compare import run_compare

    return run_compare(args.prior, args.current, args.out, cfg, device=args.device or "cpu")


def _route(args: argparse.Namespace, cfg: NodeConfig) -> int:
    from sci_node.pipeline.route_report import run_route

    return run_route(args.input, cfg, as_json=args.json, device=args.device or "cpu")


def _corrections(args: argparse.Namespace, cfg: NodeConfig) -> int:
    from sci_node.cli import corrections as cc

    if args.corrections_cmd == "show":
        return cc.show_correction(cfg, args.correction_id, as_json=args.json)
    if args.corrections_cmd == "export":
        return cc.export_cli(cfg, args.out_dir, deidentify=args.deidentify)
    if args.corrections_cmd == "ingest":
        return cc.ingest_files(cfg, args.files, origin=args.origin, as_json=args.json, sender=args.sender)
    if args.corrections_cmd in ("accept", "reject"):
        return cc.review(cfg, args.ids, args.corrections_cmd, by=args.by, force=getattr(args, "force", False),
                         as_json=args.json)
    if args.corrections_cmd == "purge":
        return cc.purge(cfg)
    return cc.list_corrections(cfg, as_json=args.json)


def _models(args: argparse.Namespace, cfg: NodeConfig) -> int:
    from sci_node.models import registry

    reg = registry.ModelRegistry(cfg.models_dir)
    if args.models_cmd == "add":
        return registry.cli_add(reg, args.path, activate=args.activate)
    if args.models_cmd == "activate":
        return registry.cli_activate(reg, args.name, args.version)
    if args.models_cmd == "rollback":
        return registry.cli_rollback(reg, args.name)
    return registry.cli_list(reg, as_json=args.json)


def _stack(args: argparse.Namespace, cfg: NodeConfig) -> int:
    from sci_node.app.stack import run_stack

    return run_stack(cfg, http_port=args.http_port, dicom_port=args.dicom_port, node_port=args.node_port,
                     config_file=args.config, **_orthanc_login())


def _demo(args: argparse.Namespace, cfg: NodeConfig) -> int:
    from sci_node.app.stack import run_demo

    return run_demo(cfg, http_port=args.http_port, dicom_port=args.dicom_port, node_port=args.node_port,
                    keep_running=not args.exit_after, config_file=args.config, **_orthanc_login())


class _OrthancLogin(TypedDict):
    orthanc_user: str | None
    orthanc_password: str | None


def _orthanc_login() -> _OrthancLogin:
    """Orthanc's HTTP login from the environment: read here, at the CLI edge, and passed in."""
    return {"orthanc_user": os.environ.get("SCI_ORTHANC_USER") or None,
            "orthanc_password": os.environ.get("SCI_ORTHANC_PASSWORD") or None}


# -- parser -------------------------------------------------------------------------------

def _late_flags(action_parsers: Iterable[argparse.ArgumentParser]) -> None:
    """``--config``, ``--data-dir`` and ``--json`` accepted after an action as well (hidden there)."""
    for action_parser in action_parsers:
        for flag in ("--config", "--data-dir"):
            action_parser.add_argument(flag, type=Path, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        action_parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    """Return the argparse tree of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="sci-node", description="sci-node: DICOM AI node for spinal cord and lesion segmentation on MRI.")
    parser.add_argument("--version", action="version", version=f"sci-node {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    _add_node_commands(sub)
    _add_peer_commands(sub)
    _add_offline_commands(sub)
    _add_admin_commands(sub)
    _add_stack_commands(sub)
    return parser


def _add_node_commands(sub: Any) -> None:
    """serve, worker, status, jobs: run and watch the node."""
    p = sub.add_parser("serve", help="run the DICOM node (SCP, queue, workers, export) in the foreground")
    _add_config_flags(p, node_flags=True)
    p.set_defaults(handler=_serve)

    p = sub.add_parser("worker", help="run a Celery inference worker for a gateway node (docs/scale-out.md)")
    _add_config_flags(p)
    _add_engine_flags(p, worker=True)
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="inference device")
    p.add_argument("--concurrency", type=int, help="tasks run at once (default 1)")
    p.add_argument("--torch-threads", dest="torch_threads", type=int,
                   help="torch threads (default 0 = CPUs minus one, shared by the tasks)")
    p.add_argument("--name", help="worker name (default sci-node-PID@HOST)")
    p.set_defaults(handler=_worker)

    p = sub.add_parser("status", help="queue depth, last jobs, active models, the engine and its workers")
    _add_config_flags(p)
    _add_engine_flags(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_status)

    p = sub.add_parser("jobs", help="list, show and retry jobs")
    _add_config_flags(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    jsub = p.add_subparsers(dest="jobs_cmd", metavar="ACTION")
    jl = jsub.add_parser("list", help="most recent jobs first")
    jl.add_argument("--limit", type=int, default=20)
    jl.add_argument("--state", help="only jobs in this state")
    js = jsub.add_parser("show", help="one job with its routing decisions, timings and deliveries")
    js.add_argument("job_id", type=int)
    jr = jsub.add_parser("retry", help="re-run a failed job or resend its results")
    jr.add_argument("job_id", type=int)
    _late_flags((jl, js, jr))  # flags after the action too: `jobs show 3 --data-dir D`
    p.set_defaults(handler=_jobs, jobs_cmd="list", limit=20, state=None)


def _add_peer_commands(sub: Any) -> None:
    """echo, send: talk DICOM to a peer."""
    for name, help_, handler in (
        ("echo", "C-ECHO a DICOM peer", _echo),
        ("send", "C-STORE a file or folder of DICOM files to a peer", _send),
    ):
        p = sub.add_parser(name, help=help_)
        _add_config_flags(p)
        if name == "send":
            p.add_argument("path", type=Path, help="DICOM file or folder (searched recursively)")
        p.add_argument("target", nargs="+", metavar="AET@HOST:PORT", help="peer, as AET@HOST:PORT or AET@HOST PORT")
        p.add_argument("--calling-ae", default="SCINODE", help="our AE title for this association")
        p.set_defaults(handler=handler)


def _add_offline_commands(sub: Any) -> None:
    """infer, compare, route (and train, registered by the trainer): batch work without the node."""
    p = sub.add_parser("infer", help="batch: segment every series under INPUT into OUTDIR")
    _add_config_flags(p)
    p.add_argument("input", type=Path, help="folder (or file) of DICOM series and/or NIfTI volumes")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"])
    p.add_argument("--torch-threads", dest="torch_threads", type=int,
                   help="torch threads (default 0 = CPUs minus one)")
    p.set_defaults(handler=_infer)

    p = sub.add_parser("compare", help="follow-up: what changed between a PRIOR and a CURRENT series (new, "
                                       "enlarging, resolved lesions; cord area)")
    _add_config_flags(p)
    p.add_argument("prior", type=Path, help="the earlier series (DICOM folder or NIfTI file)")
    p.add_argument("current", type=Path, help="the later series of the same person")
    p.add_argument("--out", type=Path, required=True, help="output folder (comparison.json, new_or_enlarging.nii.gz)")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--torch-threads", dest="torch_threads", type=int,
                   help="torch threads (default 0 = CPUs minus one)")
    p.set_defaults(handler=_compare)

    p = sub.add_parser("route", help="print the routing decision of every series under INPUT (no segmentation)")
    _add_config_flags(p)
    p.add_argument("input", type=Path, help="folder (or file) of DICOM series and/or NIfTI volumes")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.set_defaults(handler=_route)

    _add_registered_commands(sub)  # sci-node train (the trainer), after the node's own offline commands


def _add_registered_commands(sub: Any) -> None:
    """Subcommands that other installed packages register, in name order: each entry point of
    :data:`COMMANDS_GROUP` is a function ``register(subparsers, add_config_flags)`` that adds its
    parsers with a ``handler(args, cfg) -> int`` default (the trainer's ``trainer.cli:register``
    adds ``train``). The node imports none of them by name."""
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        ep.load()(sub, _add_config_flags)


def _add_admin_commands(sub: Any) -> None:
    """corrections, models: the site's corrections and the model registry."""
    p = sub.add_parser("corrections", help="radiologists' corrected SEGs: list, show, export as training data")
    _add_config_flags(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    csub = p.add_subparsers(dest="corrections_cmd", metavar="ACTION")
    csub.add_parser("list", help="every correction (pending, accepted, rejected, refused, expired), newest first")
    cs = csub.add_parser("show", help="one correction: who, when, change measures, files")
    cs.add_argument("correction_id", type=int)
    ce = csub.add_parser("export", help="write the accepted corrections as trainer input (BIDS-like)")
    ce.add_argument("out_dir", type=Path)
    ce.add_argument("--deidentify", action=argparse.BooleanOptionalAction, default=True,
                    help="strip patient identity (default; --no-deidentify keeps it)")
    ci = csub.add_parser("ingest", help="keep corrected SEG files, pending review (the Orthanc plugin calls this)")
    ci.add_argument("files", type=Path, nargs="+")
    ci.add_argument("--origin", default="cli", help="which program handed them over (recorded)")
    ci.add_argument("--sender", default=None,
                    help="who stored them, authenticated: orthanc-user:NAME or dicom:AET@IP (the plugin sets it); "
                         "default with --origin cli: cli:LOGIN, else none (refused)")
    for verdict, text in (("accept", "accept pending corrections: they reach export, training and the statistics"),
                          ("reject", "reject pending corrections: kept for the record, never used")):
        cr = csub.add_parser(verdict, help=text)
        cr.add_argument("ids", type=int, nargs="+", metavar="ID")
        cr.add_argument("--by", default=None, help="who decides (default cli:LOGIN; the status page sets "
                                                   "orthanc-user:NAME)")
        if verdict == "accept":
            cr.add_argument("--force", action="store_true", help="accept even when flagged for review")
    csub.add_parser("purge", help="apply [corrections] retention_days now")
    _late_flags(csub.choices.values())  # flags after the action too
    p.set_defaults(handler=_corrections, corrections_cmd="list")

    p = sub.add_parser("models", help="model registry: list, add, activate, rollback")
    _add_config_flags(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    msub = p.add_subparsers(dest="models_cmd", metavar="ACTION")
    msub.add_parser("list", help="every registered model version, its metrics, which is active")
    ma = msub.add_parser("add", help="register a model artefact folder (verified first)")
    ma.add_argument("path", type=Path)
    ma.add_argument("--activate", action="store_true", help="activate it once registered")
    mac = msub.add_parser("activate", help="make NAME VERSION the active model (picked up between jobs)")
    mac.add_argument("name")
    mac.add_argument("version")
    mr = msub.add_parser("rollback", help="re-activate the previously active version of NAME")
    mr.add_argument("name")
    p.set_defaults(handler=_models, models_cmd="list")


def _add_stack_commands(sub: Any) -> None:
    """stack, demo: Orthanc and the node together."""
    for name, help_, handler in (
        ("stack", "run Orthanc + the node wired together in the foreground (Ctrl-C stops both)", _stack),
        ("demo", "start the stack, send the bundled sample series, wait for the SEG, print the viewer URL", _demo),
    ):
        p = sub.add_parser(name, help=help_)
        _add_config_flags(p, node_flags=False)
        p.add_argument("--http-port", type=int, default=8042, help="Orthanc HTTP port (default 8042)")
        p.add_argument("--dicom-port", type=int, default=4242, help="Orthanc DICOM port (default 4242)")
        p.add_argument("--node-port", type=int, default=11112, help="sci-node DICOM port (default 11112)")
        p.add_argument("--stable-seconds", type=float,
                       help="seconds without a new instance before Orthanc forwards a series (Orthanc StableAge)")
        p.add_argument("--scanner", action="append", metavar="AET@IP",
                       help="a modality Orthanc accepts C-STORE from (calling AE title and source IPv4 address); "
                            "repeat for several; replaces [stack] scanners")
        p.add_argument("--dicom-bind", metavar="IP",
                       help="address of Orthanc's DICOM port ([stack] dicom_bind; default 127.0.0.1, 0.0.0.0 = every "
                            "interface)")
        if name == "demo":
            p.add_argument("--exit-after", action="store_true", help="stop the stack once the SEG has arrived")
        p.set_defaults(handler=handler)


#: One-shot batch commands whose process ends as soon as their results are written: the
#: interpreter's teardown after torch was loaded (module finalisers, torch's static destructors)
#: costs 0.5-1 s of nothing, a tenth of a one-series ``sci-node infer``; every file is closed by then.
QUICK_EXIT_COMMANDS = frozenset({"infer", "route", "compare"})


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the process exit code."""
    return _run(argv)[0]


def _run(argv: Sequence[str] | None) -> tuple[int, str]:
    """``(exit code, command)`` of one CLI invocation."""
    args = build_parser().parse_args(argv)
    if args.command in PRIVATE_COMMANDS:
        restrict_umask()  # before anything touches the data dir (and for the children the stack starts)
    try:
        cfg = _config_from_args(args)
        configure_logging(cfg.log_format, cfg.log_level)
        return int(args.handler(args, cfg)), str(args.command)
    except SciNodeError as exc:
        echo(f"sci-node: error: {exc}", sys.stderr)  # a reason may quote a sender's text: escaped
        return exc.exit_code, str(args.command)
    except KeyboardInterrupt:
        return 130, str(args.command)
    except BrokenPipeError:  # `sci-node jobs list | head -1`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not raise again
        return 141, str(args.command)


def _quick_exit(code: int) -> None:
    """Flush the logs and standard streams, then end the process without the interpreter's teardown."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to say
            pass
    os._exit(code)


def entrypoint() -> None:
    """Console-script entry point (:data:`QUICK_EXIT_COMMANDS` skip the interpreter's teardown)."""
    code, command = _run(None)
    if command in QUICK_EXIT_COMMANDS:
        _quick_exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entrypoint()
