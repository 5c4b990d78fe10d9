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
  ``downtime`` and ``total-time`` from ``query-migrate``, the wall time
  from ``migrate`` until ``cont`` returned on the destination, and "stop->cont":
  from the source's ``STOP`` event (its timestamp) until that ``cont`` returned,
  the same span as our downtime.

After every run the destination guest must print two more ``CHECK n OK``
lines (n continuing), or the run fails. CPU seconds are the machine's busy
time from ``/proc/stat`` during the run (the guest's own TCG CPU included,
for both). The table shows medians; "pause cost per GiB" is our downtime
divided by the guest size; a second table splits our pause into its phases
(``VMHandoverResult.phases``, medians). A failed handover is logged, and the
chain goes on from the source guest if it runs again; the last line says how
many of the handovers completed with the guest continuing (exit 1 if not all).

    python tools/compare_vm_handover.py --sizes 256M,1G,4G --runs 3 --channels 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, ".."), os.path.join(HERE, "..", "tests")]

from mpmultifd import MigrationConfig, qemu  # noqa: E402
from mpmultifd.cli import parse_size  # noqa: E402

import linux_guest  # noqa: E402
from linux_guest import LinuxGuest  # noqa: E402
from toolkit import fmt_size, log, machine_header, report_leftovers  # noqa: E402


def busy_seconds() -> float:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def ours(src: LinuxGuest, dst: LinuxGuest, cfg: MigrationConfig) -> dict:
    out: dict = {}
    ready = threading.Event()

    def recv() -> None:
        try:
            out["res"] = qemu.receive_vm(dst.agent_qmp_path, ("127.0.0.1", 0), cfg, timeout=600,
                                         on_listening=lambda a: (out.update(address=a), ready.set()))
        except BaseException as exc:  # noqa: BLE001 - raised below
            out["err"] = exc
            ready.set()

    t = threading.Thread(target=recv)
    t.start()
    ready.wait(60)
    if "address" not in out:
        t.join(60)
        raise out.get("err") or RuntimeError("receive_vm did not listen")
    try:
        res = qemu.migrate_vm(src.agent_qmp_path, out["address"], cfg)
    finally:
        t.join(300)
    if "err" in out:
        raise out["err"]
    return {"downtime": res.downtime, "total": res.total_time, "rounds": res.ram.rounds,
            "repaired": res.repaired_pages, "device": res.device_state_bytes, "phases": dict(res.phases)}


def qemu_multifd(src: LinuxGuest, dst: LinuxGuest, channels: int) -> dict:
    caps = [{"capability": "x-ignore-shared", "state": False}, {"capability": "multifd", "state": True}]
    for q in (src.qmp, dst.qmp):
        q.cmd("migrate-set-capabilities", {"capabilities": caps})
        q.cmd("migrate-set-parameters", {"multifd-channels": channels, "max-bandwidth": 100 * 10**9,
                                         "downtime-limit": 300})
    dst.cmd("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
    port = next(int(x["port"]) for x in dst.cmd("query-migrate")["socket-address"] if x.get("type") == "inet")
    src.qmp.events.clear()
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
    t_end, t_end_wall = time.monotonic(), time.time()
    # the source's STOP event says when QEMU paused the guest (wall clock): stop -> cont as a VM manager sees it
    stops = [ev["timestamp"] for _, ev in src.qmp.events if ev.get("event") == "STOP"]
    stop_to_cont = (t_end_wall - (stops[-1]["seconds"] + stops[-1]["microseconds"] / 1e6)) if stops else None
    return {"downtime": info.get("downtime", 0) / 1000.0, "total": info.get("total-time", 0) / 1000.0,
            "wall": t_end - t0, "stop_to_cont": stop_to_cont}


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
    tools = [t for t in ("qemu", "mpmultifd") if t in a.tools.split(",")]
    attempted = completed = 0
    work = tempfile.mkdtemp(prefix="mpm-cmpvm-")
    for size in [parse_size(s) for s in a.sizes.split(",")]:
        mib = size >> 20
        runs: dict[str, list[dict]] = {"mpmultifd": [], "qemu": []}
        guest = LinuxGuest(work, mem=mib, fill=a.fill, name=f"g{mib}-0").start(timeout=60)
        try:
            guest.wait_checks(1, timeout=1200)
            log(f"# {fmt_size(size)} guest ready: {guest.console().splitlines()[-3:]}")
            for i in range(len(tools) * a.runs):
                # q m m q q m ...: both go first as often
                tool = tools[(i + (i // 2)) % 2] if len(tools) == 2 else tools[0]
                nxt = LinuxGuest(work, mem=mib, incoming=True, name=f"g{mib}-{i + 1}").start()
                attempted += 1
                try:
                    c0 = busy_seconds()
                    r = ours(guest, nxt, cfg) if tool == "mpmultifd" else qemu_multifd(guest, nxt, a.channels)
                    r["cpu"] = busy_seconds() - c0
                    last = guest.last_check()  # the source is stopped for good now
                    checks = nxt.wait_checks(2, after=last, timeout=60)  # a BAD line raises
                    first = [n for n, _ in checks if n > last][0]
                    if first != last + 1 or guest.status() == "running":
                        raise RuntimeError(f"the guest did not continue: last {last}, then {first}")
                except Exception as exc:  # noqa: BLE001 - a failed handover must leave the source running
                    nxt.close()
                    log(f"{fmt_size(size)} run {i} {tool}: FAILED: {type(exc).__name__}: {exc}")
                    if guest.alive() and guest.status() == "running":
                        guest.wait_checks(2, after=guest.last_check(), timeout=60)
                        log("    the source guest runs on; the chain continues from it")
                        continue
                    raise
                except BaseException:
                    nxt.close()
                    raise
                guest.close()
                guest = nxt
                completed += 1
                runs[tool].append(r)
                log(f"{fmt_size(size)} run {i} {tool}: guest continued (CHECK {last} on the source, "
                    f"{first} next on the destination, all OK) "
                    + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                                  if k != "phases"}))
                if "phases" in r:
                    log("    pause phases (ms): " + ", ".join(f"{k} {v * 1000:.1f}" for k, v in r["phases"].items()))
        finally:
            guest.close()

        def med(tool: str, key: str, runs: dict[str, list[dict]] = runs) -> float:
            vals = [r[key] for r in runs[tool] if r.get(key) is not None]
            return statistics.median(vals) if vals else float("nan")

        phase_names: list[str] = []
        for r in runs["mpmultifd"]:
            phase_names += [k for k in r["phases"] if k not in phase_names]
        rows.append({
            "size": fmt_size(size),
            "ours_downtime": med("mpmultifd", "downtime"), "ours_total": med("mpmultifd", "total"),
            "ours_cpu": med("mpmultifd", "cpu"), "ours_repaired": med("mpmultifd", "repaired"),
            "qemu_downtime": med("qemu", "downtime"), "qemu_stop_to_cont": med("qemu", "stop_to_cont"),
            "qemu_total": med("qemu", "total"), "qemu_wall": med("qemu", "wall"), "qemu_cpu": med("qemu", "cpu"),
            "pause_ms_per_gib": med("mpmultifd", "downtime") * 1000 / (size / (1 << 30)),
            "phases": {k: statistics.median([r["phases"].get(k, 0.0) for r in runs["mpmultifd"]])
                       for k in phase_names},
            "runs": runs,
        })
    wall = time.monotonic() - t_all
    if a.json:
        print(json.dumps({"header": head, "rows": rows, "handovers": [completed, attempted], "wall_time": wall},
                         indent=2))
    else:
        print(f"# {head['command']}  (nproc {head['nproc']}, kernel {head['kernel']}, "
              f"load {head['load_average_at_start']:.2f})")
        print(f"# channels {a.channels}, guest fills {a.fill}% of its free memory, medians of {a.runs} runs each, "
              "alternating; downtime = source stop -> destination running")
        print("| guest | ours downtime | ours total | ours CPU s | pages repaired | QEMU stop->cont | QEMU downtime "
              "| QEMU total-time | QEMU wall | QEMU CPU s | our pause per GiB |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['size']} | {r['ours_downtime'] * 1000:.0f} ms | {r['ours_total']:.2f} s | {r['ours_cpu']:.1f} "
                  f"| {r['ours_repaired']:.0f} | {r['qemu_stop_to_cont'] * 1000:.0f} ms "
                  f"| {r['qemu_downtime'] * 1000:.0f} ms | {r['qemu_total']:.2f} s "
                  f"| {r['qemu_wall']:.2f} s | {r['qemu_cpu']:.1f} | {r['pause_ms_per_gib']:.0f} ms |")
        names: list[str] = []
        for r in rows:
            names += [k for k in r["phases"] if k not in names]
        if names:
            print("\n# our pause, phase by phase (medians, ms)")
            print("| guest | " + " | ".join(names) + " |")
            print("|---|" + "---|" * len(names))
            for r in rows:
                print(f"| {r['size']} | " + " | ".join(f"{r['phases'].get(k, 0.0) * 1000:.1f}" for k in names) + " |")
        print(f"# {completed} of {attempted} handovers completed with the guest continuing; wall time {wall:.0f} s")
    report_leftovers(os.environ["MPMULTIFD_SHM_PREFIX"])
    if completed == attempted:
        shutil.rmtree(work, ignore_errors=True)
        return 0
    log(f"# serial consoles and QEMU logs kept in {work}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
