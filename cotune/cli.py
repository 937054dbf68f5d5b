"""`cotune` command line. Each subcommand imports its runtime lazily, so `cotune --help` and
the wire commands start fast and never pull in torch."""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__


def _provision(args: argparse.Namespace) -> int:
    from bridge.errors import ProvisioningError
    from bridge.provision import check_broker_access, provision

    clients = [c for c in args.clients.split(",") if c] if args.clients else [f"client{i}" for i in range(1, args.num_clients + 1)]
    paths = provision(args.out, args.federation, clients, aggregator_id=args.aggregator, host=args.host,
                      port=args.port, max_packet_bytes=args.max_packet_bytes, extra_hosts=args.extra_host or (),
                      force=args.force, check_access=False)
    print(f"federation {args.federation!r} written to {paths.root}")
    try:
        check_broker_access(paths)
    except ProvisioningError as exc:  # only matters when this machine runs Mosquitto as root
        print(f"warning: {exc}", file=sys.stderr)
    print(f"  broker config: {paths.mosquitto_conf}")
    for party in [args.aggregator, *clients]:
        print(f"  {party:<12} {paths.party_config(party)}")
    print(f"start the broker with: cotune broker --federation-dir {paths.root}")
    return 0


def _enroll(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from bridge import enroll

    if args.action == "token":
        print(enroll.issue_token(args.fed_dir, args.party, ttl_s=args.ttl_hours * 3600))
    elif args.action == "request":
        if args.url:
            pc = enroll.enroll_online(args.dir, args.party, args.token, args.url, ca_file=args.ca)
            print(f"enrolled {pc.party_id!r} in federation {pc.federation!r}: {pc.path}")
        else:
            enroll.create_request(args.dir, args.party, args.token)
            print(f"request written to {Path(args.dir) / enroll.REQUEST_FILE}; send it to the "
                  "operator, then run `cotune enroll install` with the bundle you get back")
    elif args.action == "sign":
        from bridge.keys import read_json, write_json

        bundle = enroll.sign_request(args.fed_dir, read_json(Path(args.request)))
        write_json(Path(args.out), bundle)
        print(f"enrolled {bundle['party_id']!r} (certificate serial {bundle['serial']}); "
              f"bundle written to {args.out}")
    elif args.action == "install":
        from bridge.keys import read_json

        pc = enroll.install_bundle(args.dir, read_json(Path(args.bundle)))
        print(f"installed {pc.party_id!r} in federation {pc.federation!r}: {pc.path}")
    else:  # serve
        import signal
        import threading

        server = enroll.EnrollServer(args.fed_dir, args.host, args.port)
        stop = threading.Event()
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, lambda *_: stop.set())
        with server:
            print(json.dumps({"enroll_url": server.url}), flush=True)
            stop.wait()
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from bridge.broker import reload_running_broker
    from bridge.enroll import revoke
    from bridge.provision import FederationPaths

    rec = revoke(args.fed_dir, args.party)
    print(f"revoked {rec.party_id!r} (certificate serial {rec.serial:x}): registry, CRL, ACL, "
          "password file updated")
    pid = reload_running_broker(FederationPaths.open(args.fed_dir).mosquitto_conf)
    if pid is not None:
        print(f"sent SIGHUP to mosquitto (pid {pid}): it re-reads the CRL and ACL")
    else:
        print("no broker started by `cotune broker` runs for this federation: send SIGHUP to "
              "your Mosquitto (e.g. `systemctl reload mosquitto`) to apply the CRL and ACL")
    return 0


def _broker(args: argparse.Namespace) -> int:
    from bridge.broker import run_broker_cli

    return run_broker_cli(args.federation_dir, args.embedded, args.host, args.port)


def _demo(args: argparse.Namespace) -> int:
    if args.algorithm == "wire":
        from .wire_demo import run_wire_demo

        return run_wire_demo(size_mb=args.size_mb, out_dir=args.out)
    from .demo import run_demo  # the federated demo (needs the ML extras)

    return run_demo(args)


def _aggregator(args: argparse.Namespace) -> int:
    import json

    from aggregator.config import AggregatorConfig

    cfg = AggregatorConfig.load(args.config)
    if args.action == "status":
        from aggregator.state import StateStore

        db = __import__("pathlib").Path(cfg.state_dir) / "state.db"
        if not db.exists():
            print(f"no state yet at {db}", file=sys.stderr)
            return 1
        with StateStore(db) as store:
            print(json.dumps(store.status(), indent=2, default=str))
        return 0
    import signal

    from aggregator.service import AggregatorService

    svc = AggregatorService(cfg)
    signal.signal(signal.SIGTERM, lambda *_: svc.stop())
    status = svc.run()
    print(json.dumps({"rounds_committed": status.get("rounds_committed"), "state": str(cfg.state_dir)}))
    return 0


def _edge(args: argparse.Namespace) -> int:
    from pathlib import Path

    from edge_sdk.config import EdgeConfig
    from edge_sdk.data import load_samples

    cfg = EdgeConfig.load(args.config)
    if cfg.torch_threads:
        import torch

        torch.set_num_threads(cfg.torch_threads)
    from edge_sdk.client import EdgeClient

    base = Path(cfg.base)
    client = EdgeClient(cfg.party_config, cfg.model_path, load_samples(cfg.data, base),
                        eval_data=load_samples(cfg.eval, base), profile=cfg.profile, quant=cfg.quant,
                        work_dir=cfg.work_dir, broker=cfg.broker, gradient_checkpointing=cfg.gradient_checkpointing)
    client.run(max_idle_s=cfg.max_idle_s)
    if args.save_adapter:
        print(f"global adapter saved to {client.save_global_adapter(args.save_adapter)}")
    return 0





#: subcommands with their own argument parsers: name -> ("module:function(argv) -> int", help).
#: Imported only when called, so a device without the ML extras still runs the others.
_PASSTHROUGH = {
    "profiles": ("firmware_profiles.cli:profiles_cli", "Jetson-class device profiles: list | show ID"),
    "plan": ("firmware_profiles.cli:plan_cli", "will a training job fit on a device? (memory planner)"),
    "profile": ("edge_sdk.profiler:profile_cli",
                "measure a real training round or generation on this device, beside the plan"),
    "infer": ("edge_sdk.inference.cli:infer_cli", "generate on the device: ONNX Runtime, proxy-tuned with a large model"),
    "llm": ("aggregator.llm_server:llm_cli", "serve a local model through the OpenAI-compatible completions API"),
    "zoo": ("algorithms.zoo.cli:zoo_cli", "build / inspect the project's tiny pretrained model zoo"),
}


def _passthrough(name: str, argv: list[str]) -> int:
    import importlib

    module, func = _PASSTHROUGH[name][0].split(":")
    return int(getattr(importlib.import_module(module), func)(argv) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cotune", description="Federated knowledge transfer between edge SLMs and a cloud LLM.")
    p.add_argument("--version", action="version", version=f"cotune {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("provision", help="write a federation directory: CA, certificates, keys, broker config, ACL")
    s.add_argument("--out", required=True, help="directory to create")
    s.add_argument("--federation", default="demo", help="federation id (a topic level)")
    s.add_argument("--clients", help="comma-separated client ids (default: client1..clientN)")
    s.add_argument("--num-clients", type=int, default=3,
                   help="clients with centrally made keys (labs, tests); 0 to enroll devices instead")
    s.add_argument("--aggregator", default="aggregator")
    s.add_argument("--host", default="127.0.0.1", help="broker host name clients connect to")
    s.add_argument("--extra-host", action="append", help="additional broker certificate name (repeatable)")
    s.add_argument("--port", type=int, default=8883)
    s.add_argument("--max-packet-bytes", type=int, default=1_048_576,
                   help="largest MQTT message the application sends; the broker allows a little more")
    s.add_argument("--force", action="store_true", help="overwrite an existing federation directory")
    s.set_defaults(func=_provision)

    s = sub.add_parser("enroll", help="device enrollment: token | request | sign | install | serve")
    e = s.add_subparsers(dest="action", metavar="ACTION")
    e.required = True
    t = e.add_parser("token", help="operator: a one-time enrollment token for a party id")
    t.add_argument("fed_dir", help="federation directory (with the CA key)")
    t.add_argument("party", help="the device's party id")
    t.add_argument("--ttl-hours", type=float, default=168.0, help="token lifetime (default 7 days)")
    t = e.add_parser("request", help="device: make keys here and a request (or enroll online)")
    t.add_argument("--party", required=True, help="this device's party id")
    t.add_argument("--token", required=True, help="the token the operator gave this device")
    t.add_argument("--dir", required=True, help="the device's party directory to create")
    t.add_argument("--url", help="enrollment endpoint (`cotune enroll serve`): enroll at once")
    t.add_argument("--ca", help="CA certificate to verify the endpoint with, when the device has it")
    t = e.add_parser("sign", help="CA: verify a request, issue the certificate, register the device")
    t.add_argument("fed_dir")
    t.add_argument("request", help="enroll-request.json from the device")
    t.add_argument("--out", required=True, help="bundle file to hand back to the device")
    t = e.add_parser("install", help="device: install the CA's bundle into the party directory")
    t.add_argument("dir", help="the directory `enroll request` wrote")
    t.add_argument("bundle")
    t = e.add_parser("serve", help="CA: HTTPS enrollment endpoint (broker's server certificate)")
    t.add_argument("fed_dir")
    t.add_argument("--host", default="127.0.0.1")
    t.add_argument("--port", type=int, default=8884)
    s.set_defaults(func=_enroll)

    s = sub.add_parser("revoke", help="revoke a party: registry, CRL, ACL, password; SIGHUP broker")
    s.add_argument("fed_dir")
    s.add_argument("party")
    s.set_defaults(func=_revoke)

    s = sub.add_parser("broker", help="run Mosquitto with a federation's config, or an embedded broker")
    s.add_argument("--federation-dir", help="directory written by `cotune provision`")
    s.add_argument("--embedded", action="store_true", help="in-process amqtt broker (MQTT 3.1.1, no TLS/ACL)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.set_defaults(func=_broker)

    s = sub.add_parser("demo", help="run the main job end to end on embedded defaults")
    s.add_argument("--algorithm", default="fedavg", help="a registered algorithm, or 'wire' (encrypted blob exchange only)")
    s.add_argument("--size-mb", type=float, default=20.0, help="wire demo: blob size")
    s.add_argument("--clients", type=int, default=3)
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--quick", action="store_true", help="fewer steps and less data (about 3 minutes)")
    s.add_argument("--tiny-zoo", action="store_true", help="the zoo's quick (much smaller, weaker) models: for smoke tests")
    s.add_argument("--out", default="demo-out", help="where reports and plots go")
    s.set_defaults(func=_demo)

    s = sub.add_parser("aggregator", help="the cloud aggregator service")
    s.add_argument("action", choices=["serve", "status"])
    s.add_argument("--config", required=True, help="aggregator config JSON")
    s.set_defaults(func=_aggregator)

    s = sub.add_parser("edge", help="run an edge client from a config file (the SDK's reference app)")
    s.add_argument("action", choices=["run"])
    s.add_argument("--config", required=True, help="edge client config JSON")
    s.add_argument("--save-adapter", help="write the final global adapter here (peft format)")
    s.set_defaults(func=_edge)

    from .fleet.cli import add_parser as add_fleet_parser  # `cotune fleet simulate`

    add_fleet_parser(sub)

    for name, (_, text) in _PASSTHROUGH.items():
        s = sub.add_parser(name, help=text, add_help=False)
        s.add_argument("rest", nargs=argparse.REMAINDER)
        s.set_defaults(func=lambda a, name=name: _passthrough(name, a.rest))
    return p







def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _PASSTHROUGH:  # subcommands with their own parsers
        logging.basicConfig(level=logging.WARNING)
        return _passthrough(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # typed errors of our packages become one clear line and exit code 2
        from aggregator.errors import AggregatorError
        from bridge.errors import BridgeError

        if isinstance(exc, (BridgeError, AggregatorError)):
            print(f"cotune: error: {exc.__class__.__name__}: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
