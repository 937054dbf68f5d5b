"""Command-line hooks: ``cotune profiles ...`` and ``cotune plan ...``.

``profiles_cli(argv)`` and ``plan_cli(argv)`` take the arguments after the subcommand and
return the process exit code: 0 ok, 2 bad usage / unknown device / unreadable model config,
3 the job does not fit (the numbers are printed).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .errors import DoesNotFit, ProfileError
from .planner import (
    DEFAULT_APP_RESERVE_BYTES,
    DEFAULT_MARGIN,
    OPTIMIZERS,
    ModelShape,
    Plan,
    Workload,
    fmt_bytes,
    plan,
    recommend,
)
from .profiles import MIB, QUANT_MODES, DeviceProfile, get_profile, list_profiles

__all__ = ["EXIT_DOES_NOT_FIT", "EXIT_USAGE", "plan_cli", "profiles_cli"]

EXIT_USAGE = 2
EXIT_DOES_NOT_FIT = 3


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace | int:
    try:
        return parser.parse_args(list(argv))
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code or 0)


# ------------------------------------------------------------------------------------------
# profiles


def _profiles_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cotune profiles", description="Device profiles known to the memory planner."
    )
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="one line per device")
    ls.add_argument("--kind", choices=["jetson", "cuda", "cpu"], default=None)
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    show = sub.add_parser("show", help="everything known about one device")
    show.add_argument("id", help="profile id or alias, e.g. orin-nano-8gb")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _table(profiles: list[DeviceProfile]) -> str:
    head = (
        f"{'id':<20} {'memory':>9} {'usable':>9} {'GPU':<12} {'JetPack':<8} {'Python':<7} "
        f"{'train':<5} {'quant':<5} name"
    )
    lines = [head]
    for p in profiles:
        gpu = f"{p.gpu_arch.split()[0]} {p.compute_capability}" if p.compute_capability else "-"
        lines.append(
            f"{p.id:<20} {p.memory_bytes / 2**30:8.1f}G {p.available_bytes() / 2**30:8.1f}G "
            f"{gpu:<12} {p.jetpack or '-':<8} {p.python_version or '-':<7} "
            f"{'yes' if p.training_supported else 'no':<5} {p.default_quant():<5} {p.name}"
        )
    lines.append("usable = memory - OS reserve (before the application's own reserve)")
    return "\n".join(lines)


def profiles_cli(argv: Sequence[str]) -> int:
    """``cotune profiles list [--kind K] [--json]`` / ``cotune profiles show ID [--json]``."""
    ns = _parse(_profiles_parser(), argv)
    if isinstance(ns, int):
        return ns
    try:
        if ns.command == "list":
            profs = list_profiles(kind=ns.kind)
            if ns.json:
                print(json.dumps([p.to_dict() for p in profs], indent=2))
            else:
                print(_table(profs))
            return 0
        prof = get_profile(ns.id)
    except ProfileError as exc:
        print(f"cotune profiles: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if ns.json:
        print(json.dumps(prof.to_dict(), indent=2))
    else:
        print(prof.describe())
    return 0


# ------------------------------------------------------------------------------------------
# plan


def _plan_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cotune plan",
        description=(
            "Predict peak training memory of a LoRA fine-tuning job on a device. Without "
            "--rank/--batch/--seq/--full (or with --recommend) it recommends the FASTEST "
            "configuration that fits with a margin: the planner's estimated tokens/s among "
            "the configurations whose peak is at most (1 - margin) of the available memory; "
            "within 5% of the fastest, higher LoRA rank, higher precision, more tokens per "
            "step, less memory win. --quant, --checkpointing and --optimizer restrict the "
            "search; --rank/--batch/--seq bound it (never above what was asked; the sequence "
            "length is kept unless nothing at that length fits)."
        ),
    )
    p.add_argument("--device", required=True, help="profile id, e.g. orin-nano-8gb")
    p.add_argument(
        "--model",
        required=True,
        help="model directory, path to config.json, or the config as a JSON string",
    )
    p.add_argument("--quant", choices=QUANT_MODES, default=None)
    p.add_argument("--rank", type=int, default=None, help="LoRA rank")
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--batch", type=int, default=None, help="micro-batch size")
    p.add_argument("--seq", type=int, default=None, help="sequence length (tokens)")
    p.add_argument(
        "--checkpointing",
        action="store_true",
        default=None,
        help="activation (gradient) checkpointing",
    )
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None)
    p.add_argument("--attention", choices=["auto", "sdpa", "eager"], default="auto")
    p.add_argument("--targets", default=None, help="comma-separated LoRA target modules")
    p.add_argument(
        "--infer", action="store_true", help="plan inference (weights + KV cache) instead"
    )
    p.add_argument(
        "--app-reserve",
        type=float,
        default=DEFAULT_APP_RESERVE_BYTES / MIB,
        help="MiB kept back for the rest of the application (default %(default).0f)",
    )
    p.add_argument(
        "--os-reserved", type=float, default=None, help="override the profile's OS reserve (MiB)"
    )
    p.add_argument(
        "--margin",
        type=float,
        default=DEFAULT_MARGIN,
        help="a recommendation's peak must stay within (1 - MARGIN) of the available memory "
        "(default %(default).2f)",
    )
    p.add_argument(
        "--recommend",
        action="store_true",
        help="search even when --rank/--batch/--seq are given (they bound the search)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _policy_text(p: Plan) -> str:
    """How a recommendation was chosen, with its numbers (margin, budget, speed, runner-up)."""
    r = p.details["recommendation"]
    lines = [
        f"policy: {r['policy']}",
        f"  margin {r['margin']:.0%}: peak {fmt_bytes(p.total_bytes)} <= budget "
        f"{fmt_bytes(r['budget_bytes'])} ({1 - r['margin']:.0%} of "
        f"{fmt_bytes(r['available_bytes'])} available); {r['fitting']} of {r['candidates']} "
        f"configurations fit, {r['equally_fast']} within {r['speed_tolerance']:.0%} of the "
        "fastest",
        f"  estimated {p.tokens_per_s:,.0f} tokens/s (fastest fitting: "
        f"{r['fastest_tokens_per_s']:,.0f})",
    ]
    if r["requested"]:
        lines.append(
            "  bounded by the request: "
            + ", ".join(f"{k} <= {v}" for k, v in r["requested"].items())
        )
    if r["runner_up"]:
        ru = r["runner_up"]
        lines.append(
            f"  runner-up: {ru['workload']} ({ru['tokens_per_s']:,.0f} tokens/s, "
            f"{fmt_bytes(ru['total_bytes'])})"
        )
    return "\n".join(lines)


def _emit(ns: argparse.Namespace, payload: dict, text: str) -> None:
    print(json.dumps(payload, indent=2) if ns.json else text)


def plan_cli(argv: Sequence[str]) -> int:
    """``cotune plan --device ID --model PATH_OR_JSON [--quant Q] [--rank R] [--batch B]
    [--seq T] [--checkpointing] [--json]``: 0 fits, 3 does not fit, 2 usage error."""
    ns = _parse(_plan_parser(), argv)
    if isinstance(ns, int):
        return ns
    try:
        prof = get_profile(ns.device)
        if ns.os_reserved is not None:
            prof = prof.with_overrides(os_reserved_bytes=int(ns.os_reserved * MIB))
        shape = ModelShape.from_config(ns.model)
        reserve = int(ns.app_reserve * MIB)
        if reserve < 0:
            raise ProfileError("--app-reserve must be >= 0")
        targets = tuple(t for t in ns.targets.split(",") if t) if ns.targets else None
        if not 0 <= ns.margin < 1:
            raise ProfileError("--margin must be in [0, 1)")
        # what the user asked for bounds a search; it is never a target to maximize
        requested = {
            k: v
            for k, v in (("lora_rank", ns.rank), ("batch_size", ns.batch), ("seq_len", ns.seq))
            if v is not None
        }
        if ns.infer or ns.full or (requested and not ns.recommend):
            w = Workload(
                quant=ns.quant or prof.default_quant(),
                lora_rank=None if ns.full else (ns.rank if ns.rank is not None else 8),
                batch_size=ns.batch if ns.batch is not None else 1,
                seq_len=ns.seq if ns.seq is not None else 256,
                gradient_checkpointing=bool(ns.checkpointing),
                optimizer=ns.optimizer or "adamw",
                lora_targets=targets,
                attention=ns.attention,
                mode="infer" if ns.infer else "train",
            )
            p = plan(shape, prof, w, app_reserve_bytes=reserve)
            if p.fits:
                _emit(ns, {"mode": "plan", **p.to_dict()}, p.explain())
                return 0
            suggestion = None
            if not ns.infer:
                fixed = {"attention": ns.attention}
                if targets:
                    fixed["lora_targets"] = targets
                try:
                    suggestion = recommend(
                        shape,
                        prof,
                        fixed,
                        app_reserve_bytes=reserve,
                        margin=ns.margin,
                        requested=requested,
                    )
                except DoesNotFit:
                    suggestion = None
            text = p.explain()
            text += (
                f"\nwhat would fit: {suggestion.workload.describe()}\n"
                + _policy_text(suggestion)
                if suggestion is not None
                else "\nnothing in the default search space fits this device"
                + (" within what was asked" if requested else "")
            )
            _emit(
                ns,
                {
                    "mode": "plan",
                    **p.to_dict(),
                    "short_by_bytes": -p.headroom_bytes,
                    "suggestion": suggestion.to_dict() if suggestion else None,
                },
                text,
            )
            print(
                f"cotune plan: does not fit {prof.id}: short by {fmt_bytes(-p.headroom_bytes)}",
                file=sys.stderr,
            )
            return EXIT_DOES_NOT_FIT
        # recommend, with whatever the user fixed
        cands: dict[str, object] = {"attention": ns.attention}
        if ns.quant:
            cands["quant"] = ns.quant
        if ns.checkpointing is not None:
            cands["gradient_checkpointing"] = True
        if ns.optimizer:
            cands["optimizer"] = ns.optimizer
        if targets:
            cands["lora_targets"] = targets
        try:
            best = recommend(
                shape,
                prof,
                cands,
                app_reserve_bytes=reserve,
                margin=ns.margin,
                requested=requested,
            )
        except DoesNotFit as exc:
            _emit(
                ns,
                {"mode": "recommend", "fits": False, **exc.to_dict()},
                f"{exc}\n\nsmallest configuration tried:\n{exc.plan.explain()}",
            )
            print(f"cotune plan: {exc}", file=sys.stderr)
            return EXIT_DOES_NOT_FIT
        _emit(
            ns,
            {"mode": "recommend", **best.to_dict()},
            f"recommended: {best.workload.describe()}\n{_policy_text(best)}\n{best.explain()}",
        )
        return 0
    except ProfileError as exc:
        print(f"cotune plan: {exc}", file=sys.stderr)
        return EXIT_USAGE
