#!/usr/bin/env python3
"""A running Linux VM handed over by mpmultifd, next to QEMU's own multifd migration of the same guest.

One guest per size (``tests/linux_guest.py``: Debian cloud kernel, busybox
init that checks the md5 of a file every 0.2 s while rewriting another; here it
also fills ``--fill`` percent of its free memory with data first, so most of
its RAM must move). The guest is passed along a chain of fresh destination
QEMUs (``-incoming defer -S``, a backend file of their own), alternating run
by run between:

- **mpmultifd**: ``mpmultifd.qemu.migrate_vm`` / ``receive_vm`` over loopback
  with ``--channels`` channels; downtime is what a VM manager sees, from QMP
  ``stop`` on the source to ``cont`` returning on the destination; total time
  from the call until then;
- **QEMU multifd**: ``migrate`` with the ``multifd`` capability and the same
  channel count, ``x-ignore-shared`` off (QEMU copies the shared RAM itself),
  ``max-bandwidth`` 100 GB/s, default 300 ms ``downtime-limit``; QEMU's own
  ``downtime`` and ``total-time`` from ``query-migrate``, plus the wall time
  from ``migrate`` until ``cont`` returned on the destination.

After every run the destination guest must print two more ``CHECK n OK``
lines (n continuing), or the run fails. CPU seconds are the machine's busy
time from ``/proc/stat`` during the run (the guest's own TCG CPU included,
for both). The table shows medians; "pause cost per GiB" is our downtime
divided by the guest size.

    python tools/compare_vm_handover.py --sizes 256M,1G,4G --runs 3 --channels 2
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, ".."), os.path.join(HERE, "..", "tests")]

import linux_guest  # noqa: E402
from linux_guest import LinuxGuest  # noqa: E402

from mpmultifd import Destination, GuestRAM, MigrationConfig, Source, qemu  # noqa: E402
from mpmultifd.cli import parse_size  # noqa: E402
from toolkit import fmt_size, log, machine_header, report_leftovers  # noqa: E402

HOOKS = "on_stream" in inspect.signature(Destination.__init__).parameters


def busy_seconds() -> float:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def ours(src: LinuxGuest, dst: LinuxGuest, cfg: MigrationConfig) -> dict:
    if HOOKS:
        out: dict = {}
        ready = threading.Event()

        def recv() -> None:
            try:
                out["res"] = qemu.receive_vm(dst.agent_qmp_path, ("127.0.0.1", 0), cfg,
                                             on_listening=lambda a: (out.update(address=a), ready.set()))
            except BaseException as exc:  # noqa: BLE001
                out["err"] = exc
                ready.set()

        t = threading.Thread(target=recv)
        t.start()
        ready.wait(60)
        if "address" not in out:
            t.join()
            raise out.get("err") or RuntimeError("receive_vm did not listen")
        try:
            res = qemu.migrate_vm(src.agent_qmp_path, out["address"], cfg)
        finally:
            t.join(300)
        if "err" in out:
            raise out["err"]
        return {"downtime": res.downtime, "total": res.total_time, "rounds": res.ram.rounds,
                "repaired": res.repaired_pages, "device": res.device_state_bytes}
    return emulated(src, dst, cfg)


def emulated(src: LinuxGuest, dst: LinuxGuest, cfg: MigrationConfig) -> dict:
    """migrate_vm's steps without the core hooks: RAM (committed), verify+repair, device state, cont."""
    from mpmultifd.testing import RemoteDestination

    qs, qd = src.qmp, dst.qmp
    qemu._set_capabilities(qs, source=True)
    qemu._set_capabilities(qd, source=False)
    sram = GuestRAM.from_files({"ram0": src.mem_path})
    dram = GuestRAM.from_files({"ram0": dst.mem_path})
    c = cfg.replace(dirty_tracker="scan", verify=False)
    t0 = time.monotonic()
    ts: dict = {}
    try:
        with RemoteDestination(dram.name, c, start_method=c.start_method) as rd, Source(sram, c) as s:
            def pause() -> None:
                ts["stop"] = time.monotonic()
                qs.cmd("stop")

            r = s.migrate(rd.address, pause=pause, resume=lambda: qs.cmd("cont"))
            rd.result(60)
        a, b = socket.socketpair()
        inc = qemu._Incoming(qd, dram, 60)
        th = threading.Thread(target=inc, args=(b,))
        th.start()
        try:
            _, repaired = qemu._verify_and_repair(sram, a)
            n = qemu._send_device_state(qs, a, time.monotonic() + 60)
            ans = qemu._recv_json(a, "device state")
            if ans.get("status") != "loaded":
                raise RuntimeError(ans)
            qd.cmd("cont")
            t_end = time.monotonic()
        finally:
            th.join(60)
            inc.close()
            a.close()
        return {"downtime": t_end - ts["stop"], "total": t_end - t0, "rounds": r.rounds, "repaired": repaired,
                "device": n}
    finally:
        for ram in (sram, dram):
            ram.close()
            ram.unlink()


def qemu_multifd(src: LinuxGuest, dst: LinuxGuest, channels: int) -> dict:
    caps = [{"capability": "x-ignore-shared", "state": False}, {"capability": "multifd", "state": True}]
    for q in (src.qmp, dst.qmp):
        q.cmd("migrate-set-capabilities", {"capabilities": caps})
        q.cmd("migrate-set-parameters", {"multifd-channels": channels, "max-bandwidth": 100 * 10**9,
                                         "downtime-limit": 300})
    dst.cmd("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
    port = next(int(x["port"]) for x in dst.cmd("query-migrate")["socket-address"] if x.get("type") == "inet")
    t0 = time.monotonic()
    src.cmd("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
    while True:
        info = src.cmd("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            break
        if time.monotonic() - t0 > 600:
            raise RuntimeError("QEMU migration did not finish in 600 s")
        time.sleep(0.01)
    if info["status"] != "completed":
        raise RuntimeError(f"QEMU migration {info['status']}: {info.get('error-desc')}")
    while dst.cmd("query-migrate").get("status") != "completed":
        time.sleep(0.005)
    # QEMU starts the destination by itself when the source ran; with -S it waits for cont
    if dst.status() != "running":
        dst.cmd("cont")
    t_end = time.monotonic()
    return {"downtime": info.get("downtime", 0) / 1000.0, "total": info.get("total-time", 0) / 1000.0,
            "wall": t_end - t0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="256M,1G")
    p.add_argument("--runs", type=int, default=3, help="runs of each tool per size (alternating)")
    p.add_argument("--channels", type=int, default=2)
    p.add_argument("--fill", type=int, default=80, help="percent of the guest's free memory it fills with data")
    p.add_argument("--tools", default="mpmultifd,qemu", help="which to run: mpmultifd, qemu or both (default)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    why = linux_guest.missing()
    if why:
        print(why, file=sys.stderr)
        return 2
    os.environ.setdefault("MPMULTIFD_SHM_PREFIX", f"mpmcmpvm{os.getpid()}_")
    cfg = MigrationConfig(channels=a.channels, downtime_limit=0.3, stall_downtime_limit=float("inf"),
                          start_method="forkserver")
    head = machine_header()
    t_all = time.monotonic()
    rows = []
    work = tempfile.mkdtemp(prefix="mpm-cmpvm-")
    for size in [parse_size(s) for s in a.sizes.split(",")]:
        mib = size >> 20
        runs: dict[str, list[dict]] = {"mpmultifd": [], "qemu": []}
        guest = LinuxGuest(work, mem=mib, fill=a.fill, name=f"g{mib}-0").start(timeout=60)
        try:
            guest.wait_checks(1, timeout=1200)
            log(f"# {fmt_size(size)} guest ready: {guest.console().splitlines()[-3:]}")
            tools = [t for t in ("qemu", "mpmultifd") if t in a.tools.split(",")]
            for i in range(len(tools) * a.runs):
                # q m m q q m ...: both go first as often
                tool = tools[(i + (i // 2)) % 2] if len(tools) == 2 else tools[0]
                nxt = LinuxGuest(work, mem=mib, incoming=True, name=f"g{mib}-{i + 1}").start()
                try:
                    c0 = busy_seconds()
                    r = ours(guest, nxt, cfg) if tool == "mpmultifd" else qemu_multifd(guest, nxt, a.channels)
                    r["cpu"] = busy_seconds() - c0
                    last = guest.last_check()  # the source is stopped for good now
                    checks = nxt.wait_checks(2, timeout=60)
                    if checks[0][0] != last + 1:
                        raise RuntimeError(f"the guest did not continue: last {last}, then {checks[:3]}")
                except BaseException:
                    nxt.close()
                    raise
                guest.close()
                guest = nxt
                runs[tool].append(r)
                log(f"{fmt_size(size)} run {i} {tool}: guest continued (CHECK {last} on the source, "
                    f"{checks[0][0]} next on the destination, all OK) " + json.dumps({k: round(v, 4) for k, v in r.items()}))
        finally:
            guest.close()

        def med(tool: str, key: str) -> float:
            vals = [r[key] for r in runs[tool] if r.get(key) is not None]
            return statistics.median(vals) if vals else float("nan")

        rows.append({
            "size": fmt_size(size),
            "ours_downtime": med("mpmultifd", "downtime"), "ours_total": med("mpmultifd", "total"),
            "ours_cpu": med("mpmultifd", "cpu"), "ours_repaired": med("mpmultifd", "repaired"),
            "qemu_downtime": med("qemu", "downtime"), "qemu_total": med("qemu", "total"),
            "qemu_wall": med("qemu", "wall"), "qemu_cpu": med("qemu", "cpu"),
            "pause_ms_per_gib": med("mpmultifd", "downtime") * 1000 / (size / (1 << 30)),
            "runs": runs,
        })
    wall = time.monotonic() - t_all
    if a.json:
        print(json.dumps({"header": head, "hooks": HOOKS, "rows": rows, "wall_time": wall}, indent=2))
    else:
        print(f"# {head['command']}  (nproc {head['nproc']}, kernel {head['kernel']}, "
              f"load {head['load_average_at_start']:.2f})")
        if not HOOKS:
            print("# core hooks missing: RAM committed before verify+repair and the device state (same steps)")
        print(f"# channels {a.channels}, guest fills {a.fill}% of its free memory, medians of {a.runs} runs each, "
              "alternating; downtime = source stop -> destination running")
        print("| guest | ours downtime | ours total | ours CPU s | pages repaired | QEMU downtime | QEMU total-time "
              "| QEMU wall | QEMU CPU s | our pause per GiB |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['size']} | {r['ours_downtime'] * 1000:.0f} ms | {r['ours_total']:.2f} s | {r['ours_cpu']:.1f} "
                  f"| {r['ours_repaired']:.0f} | {r['qemu_downtime'] * 1000:.0f} ms | {r['qemu_total']:.2f} s "
                  f"| {r['qemu_wall']:.2f} s | {r['qemu_cpu']:.1f} | {r['pause_ms_per_gib']:.0f} ms |")
        print(f"# wall time {wall:.0f} s")
    report_leftovers(os.environ["MPMULTIFD_SHM_PREFIX"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
