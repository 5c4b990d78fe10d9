"""``mpmultifd vm-send`` / ``mpmultifd vm-recv``: hand a running QEMU VM to another host.

Destination host first (QEMU started with ``-incoming defer -S`` and the same
shared memory backends as the source's, each a file of its own)::

    mpmultifd vm-recv --qmp /run/vm1-dst.qmp --listen 0.0.0.0:4444 --auth-key-file key

Source host::

    mpmultifd vm-send --qmp /run/vm1.qmp dst-host:4444 --auth-key-file key --channels 4

Exit codes: 0 the VM runs on the destination; 1 the handover failed (the
source VM runs again, the destination VM was not started); 3 (vm-send only)
the connection broke after COMMIT: the source VM stays stopped and the
destination host knows whether its VM runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .errors import MigrationError

__all__ = ["add_vm_commands"]


def _say(a: argparse.Namespace, obj: dict[str, Any], text: str) -> None:
    if a.json:
        print(json.dumps(obj), flush=True)
    else:
        print(text, flush=True)


def _describe(res: Any) -> str:
    down = "unknown (the destination's answer was lost)" if res.downtime is None else f"{res.downtime * 1000:.1f} ms"
    ram = res.ram
    return (
        f"{'handed over' if res.role == 'source' else 'received'} "
        f"{sum(b.size for b in res.backends) / (1 << 20):.0f} MiB of RAM in {ram.rounds} rounds "
        f"({ram.transferred / (1 << 20):.1f} MiB sent), device state {res.device_state_bytes / 1024:.0f} KiB, "
        f"{res.repaired_pages} pages repaired; downtime {down}, total {res.total_time:.2f} s"
    )


def cmd_vm_send(a: argparse.Namespace) -> int:
    from .errors import CommitUnknown
    from .qemu import VMHandoverError, migrate_vm

    cfg = a.make_config(a)
    if not a.verify:
        print("vm-send: --no-verify is ignored: a VM handover always verifies the paused RAM", file=sys.stderr)
    on_event = (lambda ev: print(json.dumps(ev), flush=True)) if a.json else None
    try:
        res = migrate_vm(a.qmp, a.address, cfg, device_timeout=a.device_timeout, on_event=on_event)
    except CommitUnknown as exc:
        _say(a, {"event": "result", "status": "unknown", "error": str(exc), "source-running": False},
             f"vm-send: {exc}\nthe source VM stays stopped; ask the destination host whether its VM runs")
        return 3
    except VMHandoverError as exc:
        _say(a, {"event": "result", "status": "failed", "error": str(exc), "source-running": exc.source_running,
                 "destination-started": False}, f"vm-send: {exc}")
        return 1
    except MigrationError as exc:
        _say(a, {"event": "result", "status": "failed", "error": str(exc), "destination-started": False},
             f"vm-send: {exc}")
        return 1
    _say(a, {"event": "result", "status": "completed", **res.to_dict()}, _describe(res))
    return 0


def cmd_vm_recv(a: argparse.Namespace) -> int:
    from .qemu import receive_vm

    cfg = a.make_config(a, server=True)

    def listening(address: Any) -> None:
        text = address if isinstance(address, str) else f"{address[0]}:{address[1]}"
        _say(a, {"event": "listening", "address": text}, f"listening on {text}; receiving the VM of {a.qmp}")

    try:
        res = receive_vm(a.qmp, a.listen, cfg, device_timeout=a.device_timeout, on_listening=listening,
                         timeout=a.wait)
    except MigrationError as exc:
        _say(a, {"event": "result", "status": "failed", "error": str(exc), "destination-started": False},
             f"vm-recv: {exc}")
        return 1
    _say(a, {"event": "result", "status": "completed", **res.to_dict()}, _describe(res))
    return 0


def add_vm_commands(sub: Any, config_args: Any, parse_address: Any, make_config: Any) -> None:
    """Register ``vm-send`` and ``vm-recv`` on the ``mpmultifd`` subparsers.

    ``config_args(parser)`` adds the tuning and connection flags;
    ``make_config(args, server=...)`` turns them into a MigrationConfig.
    """
    s = sub.add_parser("vm-send", help="hand the running QEMU VM behind --qmp to a vm-recv at HOST:PORT")
    s.add_argument("address", type=parse_address, help="HOST:PORT (or unix:/path) where vm-recv listens")
    s.add_argument("--qmp", required=True, help="the source QEMU's QMP Unix socket (one it does not otherwise use)")
    s.add_argument("--device-timeout", type=float, default=60.0,
                   help="seconds for QEMU's device state to be sent and loaded (default 60)")
    s.add_argument("--json", action="store_true", help="one JSON object per line: events, then the result")
    config_args(s)
    s.set_defaults(func=cmd_vm_send, make_config=make_config)

    r = sub.add_parser("vm-recv", help="receive a VM from vm-send into the QEMU behind --qmp (-incoming defer)")
    r.add_argument("--qmp", required=True, help="the destination QEMU's QMP Unix socket")
    r.add_argument("--listen", type=parse_address, default=("127.0.0.1", 4444), help="HOST:PORT or unix:/path")
    r.add_argument("--device-timeout", type=float, default=60.0,
                   help="seconds for QEMU's device state to arrive and load (default 60)")
    r.add_argument("--wait", type=float, default=None, help="give up if no handover completes in this many seconds")
    r.add_argument("--json", action="store_true", help="one JSON object per line: listening, then the result")
    config_args(r)
    r.set_defaults(func=cmd_vm_recv, make_config=make_config)

