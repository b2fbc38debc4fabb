"""``sgdm-ldm info``: this installation (versions, kernels, GPUs, offline files) and, with ``--check``,
every op against its reference on this machine's devices (:mod:`sgdm.environment`, :mod:`sgdm.ops.selfcheck`)."""
from __future__ import annotations

import argparse
import json
import sys

DESCRIPTION = """\
Print what this installation is: versions, whether the compiled kernels
(sgdm._C) loaded and which CPU ISA and CUDA kernels they hold, the GPUs this
process sees, which implementation each op runs per device, the environment
variables sgdm reads, and which pretrained files an offline machine holds.
Paste it into bug reports.

--check also runs every op (GroupNorm+SiLU, the guided DDIM step, attention)
forward and backward on small odd shapes against its float64 reference, on the
CPU and on each visible GPU: what to run after `pip install -e .` on a new
machine or GPU.

Exit status: 0; 1 when --check finds an op outside its tolerance; 2 for --device
without --check, or --device cuda where no GPU is visible.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("info", help="this installation: versions, kernels, GPUs; --check runs the ops",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="run every op against its reference (a few seconds)")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default=None,
                        help="devices --check runs on (default 'all': the CPU and every visible GPU)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    parser.set_defaults(func=run)
    return parser


def _devices(choice: str) -> list[str]:
    import torch

    from sgdm.config import ConfigError

    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    if choice == "cuda" and not gpus:
        raise ConfigError("--device", "cuda, but this process sees no GPU (torch.cuda.is_available() is False)")
    return {"cpu": ["cpu"], "cuda": gpus, "all": ["cpu", *gpus]}[choice]


def run(args: argparse.Namespace) -> int:
    from sgdm.environment import collect, format_report

    if args.device is not None and not args.check:
        from sgdm.config import ConfigError

        raise ConfigError("--device", "chooses where --check runs; add --check")
    devices = _devices(args.device or "all") if args.check else []
    info = collect()
    checks = []
    if args.check:
        from sgdm.ops.selfcheck import check_ops

        for device in devices:
            checks += check_ops(device)
        info["checks"] = [{**vars(c), "ok": c.ok} for c in checks]
    if args.json:
        json.dump(info, sys.stdout, indent=1)
        print()
    else:
        print(format_report(info))
        if checks:
            print("\nchecks against the float64 references (error: max |got - want| / max(1, max |want|))")
            for c in checks:
                print("  " + c.line())
    failed = [c for c in checks if not c.ok]
    if failed:
        print(f"sgdm-ldm info: {len(failed)} of {len(checks)} op checks failed: "
              + "; ".join(f"{c.op} {c.case} on {c.device} {c.dtype} ({c.backend})" for c in failed[:5]),
              file=sys.stderr)
        return 1
    if checks and not args.json:
        print(f"all {len(checks)} op checks passed")
    return 0
