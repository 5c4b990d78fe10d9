#!/usr/bin/env python3
"""Resident memory of every process in a migration, beyond the shared guest-RAM region.

For every content, compression method and channel count, ``--runs`` times
(interleaved run by run), a region is migrated into a fresh region in a
destination process (``RemoteDestination``), as ``tools/bench.py`` does. A
thread in this process reads ``/proc/PID/smaps`` of every descendant of this
process (``/proc/*/stat`` parent links) every ``--interval`` seconds (default
0.05) while the migration runs, and once more when ``Source.migrate`` returns. Each process gets a role:

- **coordinator**: this process (the Source's precopy loop runs in it);
- **send worker**: a descendant that maps the source region (``mpmultifd-send-N``);
- **destination**: a descendant that maps the destination region and has no
  ancestor that does (``RemoteDestination``'s process, the Destination's coordinator);
- **recv worker**: a descendant that maps the destination region below the
  destination process (``mpmultifd-recv-N``);
- **helper**: anything else (forkservers, resource trackers).

Reading ``smaps`` makes the kernel walk the page tables of every mapping, so it
costs time in proportion to what the process has resident: about 40 ms per GiB
of resident shared region on the 2-vCPU development VM (the coordinator maps
the whole source region). With ``--sampler full`` (the default) every sample
reads ``smaps`` of every process, so a sample takes far longer than 50 ms on a
1 GiB region and the thread samples back to back, taking CPU from the
migration (the tool prints the sample time and the sampler thread's CPU
time). ``--sampler growth`` reads only ``/proc/PID/status`` every sample
(kernel counters) and a process's ``smaps`` when its ``RssAnon + RssFile``
grew by 512 KiB since its last reading, so private-memory peaks are still
caught to within 512 KiB; its Pss and region columns then come from those
fewer readings (Rss peaks always include ``status``'s ``VmRSS``).

Per process it keeps the peak (over all samples) and the final value (its last
sample: for a worker, at most one interval before it exited) of:

- ``Rss`` and ``Pss`` of the whole process, shared region included;
- **priv+anon**: over every mapping whose path does not start with ``/dev/shm/``,
  ``Private_Clean + max(Private_Dirty, Anonymous)``. Anonymous pages that only
  this process maps are already in ``Private_Dirty``, so adding ``Anonymous`` on
  top would count them twice; what ``max`` adds is the anonymous memory a forked
  worker still shares copy-on-write with its forkserver (the preloaded
  interpreter and numpy heap), which ``Private_*`` leave out. This is the figure
  checked against the target "per-worker resident memory beyond the
  shared region <= 48 MiB";
- **private**: ``Private_Clean + Private_Dirty`` of the same mappings: what the
  process alone holds (what its exit would give back);
- **literal**: ``Private_Clean + Private_Dirty + Anonymous`` of the same mappings
  (the sum as first specified; it counts private anonymous pages twice);
- **region Rss**: ``Rss`` of the mappings of the source or destination region's
  segments (its block segments and its meta segment with the dirty maps);
  **other shm Rss**: ``Rss`` of every other ``/dev/shm`` mapping (rings, the
  destination's received-map and statistics segments).

At the peak of priv+anon it also keeps which mappings held it (summed by path;
``[anon]`` for unnamed anonymous mappings; each with its private part), shown
under the table for the worst process of each role and method.

The table shows, per role and configuration, the largest value over the
processes of that role (the worst worker) in each run, then the median over
runs. Verification at switchover is on (the library default; ``--no-verify``
turns it off). Every segment this tool creates is named with a prefix of its
own (``MPMULTIFD_SHM_PREFIX``); after the last run the tool checks that none
is left in ``/dev/shm``.

Example::

    python tools/measure_memory.py --size 1G --channels 1,2,4,8 --runs 1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mpmultifd import GuestRAM, MigrationConfig, Source  # noqa: E402
from mpmultifd.cli import parse_size  # noqa: E402
from mpmultifd.testing import CONTENTS, RemoteDestination, fill  # noqa: E402

from toolkit import (  # noqa: E402
    caused_by_interrupt,
    fmt_size,
    log,
    machine_header,
    raise_interrupt,
    report_leftovers,
    wall_time_line,
)

TARGET_MIB = 48.0  # target: per-worker resident memory beyond the shared region
ROLES = ("coordinator", "send worker", "destination", "recv worker")
WORKER_ROLES = ("send worker", "recv worker")

# one header line per mapping: "start-end perms offset dev inode   [path]"
_HEADER = re.compile(rb"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+[ \t]*(.*)$", re.M)
# the fields this tool needs, in the order the kernel prints them in every mapping
_FIELDS = re.compile(rb"^(Rss|Pss|Private_Clean|Private_Dirty|Anonymous):\s+(\d+) kB$", re.M)
_NFIELDS = 5


# --------------------------------------------------------------------------- /proc


def process_table() -> dict[int, int]:
    """pid -> ppid of every process now, from /proc/*/stat."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name (field 2) may hold spaces and parentheses: split after the last ')'
        rest = stat.rpartition(b")")[2].split()
        if len(rest) > 1:
            out[int(d)] = int(rest[1])
    return out


def descendants(root: int, table: dict[int, int]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), ()):
            out.append(c)
            todo.append(c)
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


_STATUS = re.compile(rb"^(VmHWM|VmRSS|RssAnon|RssFile|RssShmem):\s+(\d+) kB$", re.M)


def read_status(pid: int) -> dict | None:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem (KiB) from /proc/PID/status: kernel counters, no page walk."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            data = f.read()
    except OSError:
        return None
    got = {k.decode(): int(v) for k, v in _STATUS.findall(data)}
    if not got.get("VmRSS"):
        return None  # gone, a zombie, or a kernel thread
    return got


def read_smaps(pid: int, regions: dict[str, set[bytes]]) -> dict | None:
    """One reading of /proc/PID/smaps, in KiB; None if the process is gone (or a zombie)."""
    try:
        with open(f"/proc/{pid}/smaps", "rb") as f:
            data = f.read()
    except OSError:
        return None
    if not data:
        return None  # gone (or a zombie)
    paths = [m.group(1).strip() for m in _HEADER.finditer(data)]
    values = [int(v) for _, v in _FIELDS.findall(data)]
    if len(values) != _NFIELDS * len(paths):
        return None  # a format this parser does not know; never seen on Linux 4.x-6.x
    rss = pss = priv = priv_anon = literal = 0
    region = {name: 0 for name in regions}
    shm_other = 0
    by_path: dict[bytes, list[int]] = {}  # path -> [priv+anon, private]
    if not any(values[0::_NFIELDS]):
        return None  # an exiting process whose memory is already torn down
    for i, path in enumerate(paths):
        m_rss, m_pss, p_clean, p_dirty, anon = values[_NFIELDS * i : _NFIELDS * i + _NFIELDS]
        rss += m_rss
        pss += m_pss
        if path.startswith(b"/dev/shm/"):
            bare = path[: -len(b" (deleted)")] if path.endswith(b" (deleted)") else path
            for name, segs in regions.items():
                if bare in segs:
                    region[name] += m_rss
                    break
            else:
                shm_other += m_rss
            continue
        priv += p_clean + p_dirty
        literal += p_clean + p_dirty + anon
        contrib = p_clean + max(p_dirty, anon)
        priv_anon += contrib
        if contrib:
            key = path or b"[anon]"
            got = by_path.setdefault(key, [0, 0])
            got[0] += contrib
            got[1] += p_clean + p_dirty
    return {
        "rss": rss,
        "pss": pss,
        "priv_anon": priv_anon,
        "private": priv,
        "literal": literal,
        "region": region,
        "shm_other": shm_other,
        "by_path": by_path,
    }


class ProcessRecord:
    """Peaks and last values of one process over a run (KiB)."""

    METRICS = ("rss", "pss", "priv_anon", "private", "literal", "region_rss", "shm_other")

    def __init__(self, pid: int, ppid: int) -> None:
        self.pid = pid
        self.ppid = ppid
        self.cmd = cmdline(pid)
        self.maps: set[str] = set()  # which regions ("source", "destination") it ever mapped
        self.peak = dict.fromkeys(self.METRICS, 0)
        self.final = dict.fromkeys(self.METRICS, 0)
        self.top: list[tuple[str, int, int]] = []  # (path, priv+anon, private) at the peak of priv_anon
        self.samples = 0  # smaps readings
        self.first_seen = self.last_seen = 0.0
        self.status_peak: dict[str, int] = {}  # VmRSS, RssAnon, RssFile, RssShmem peaks, last VmHWM
        self.status_samples = 0
        self.level = -1  # RssAnon + RssFile at the last smaps reading
        self.shmem_level = 0  # RssShmem at the last smaps reading

    def add_status(self, st: dict) -> None:
        for k, v in st.items():
            self.status_peak[k] = v if k == "VmHWM" else max(self.status_peak.get(k, 0), v)
        self.status_samples += 1

    def add(self, s: dict, t: float) -> None:
        vals = {
            "rss": s["rss"],
            "pss": s["pss"],
            "priv_anon": s["priv_anon"],
            "private": s["private"],
            "literal": s["literal"],
            "region_rss": sum(s["region"].values()),
            "shm_other": s["shm_other"],
        }
        for name, kib in s["region"].items():
            if kib:
                self.maps.add(name)
        if vals["priv_anon"] > self.peak["priv_anon"] or not self.samples:
            top = sorted(s["by_path"].items(), key=lambda kv: -kv[1][0])[:6]
            self.top = [(p.decode(errors="replace"), both[0], both[1]) for p, both in top]
        for k, v in vals.items():
            self.peak[k] = max(self.peak[k], v)
        self.final = vals
        if not self.samples:
            self.first_seen = t
        self.last_seen = t
        self.samples += 1


class Sampler:
    """Reads /proc of this process and all its descendants every ``interval`` seconds, from a thread.

    Every tick reads ``status`` of every process (cheap kernel counters). Mode
    ``full`` also reads ``smaps`` of every process every tick; mode ``growth``
    reads a process's ``smaps`` only when it is first seen, while it has not
    yet mapped a region it has shared memory of, and when its
    ``RssAnon + RssFile`` rose by ``GROWTH_KIB`` or more since its last
    ``smaps`` reading (so no peak of its private memory is missed by more
    than that). ``sample(force=True)`` reads every ``smaps``.
    """

    GROWTH_KIB = 512

    def __init__(self, interval: float, regions: dict[str, set[bytes]], mode: str = "full") -> None:
        self.interval = interval
        self.mode = mode
        self.regions = regions
        self.me = os.getpid()
        self.records: dict[int, ProcessRecord] = {}
        self.parents: dict[int, int] = {}
        self.durations: list[float] = []
        self.smaps_reads = 0
        self.cpu = 0.0  # CPU seconds of the sampler thread
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="smaps-sampler", daemon=True)
        self._t0 = time.monotonic()

    def start(self) -> Sampler:
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        c0 = time.thread_time()
        while not self._stop.is_set():
            t = time.monotonic()
            self.sample()
            self.cpu = time.thread_time() - c0
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - t)))

    def sample(self, force: bool = False) -> None:
        with self._lock:
            t0 = time.perf_counter()
            table = process_table()
            now = time.monotonic() - self._t0
            for pid in [self.me] + descendants(self.me, table):
                st = read_status(pid)
                if st is None:
                    continue
                rec = self.records.get(pid)
                if rec is None:
                    rec = self.records[pid] = ProcessRecord(pid, table.get(pid, 0))
                    self.parents[pid] = rec.ppid
                rec.add_status(st)
                level = st.get("RssAnon", 0) + st.get("RssFile", 0)
                if not (
                    force
                    or self.mode == "full"
                    or rec.level < 0
                    or level >= rec.level + self.GROWTH_KIB
                    or (not rec.maps and st.get("RssShmem", 0) >= rec.shmem_level + self.GROWTH_KIB)
                ):
                    continue
                s = read_smaps(pid, self.regions)
                self.smaps_reads += 1
                if s is not None:
                    rec.add(s, now)
                    rec.level = level
                    rec.shmem_level = st.get("RssShmem", 0)
            self.durations.append(time.perf_counter() - t0)

    def roles(self) -> dict[int, str]:
        """Role of every process seen (see the module documentation)."""
        out = {}
        for pid, rec in self.records.items():
            if pid == self.me:
                out[pid] = "coordinator"
            elif "source" in rec.maps:
                out[pid] = "send worker"
            elif "destination" in rec.maps:
                anc, above = self.parents.get(pid), False
                while anc and anc != self.me:
                    r = self.records.get(anc)
                    if r is not None and "destination" in r.maps:
                        above = True
                        break
                    anc = self.parents.get(anc)
                out[pid] = "recv worker" if above else "destination"
            else:
                out[pid] = "helper"
        return out


def region_paths(ram: GuestRAM) -> set[bytes]:
    paths = {os.path.join("/dev/shm", ram.name)} | {b.path for b in ram.blocks}
    return {p.encode() for p in paths}


# --------------------------------------------------------------------------- one run


def migrate_once(src: GuestRAM, channels: int, method: str, level: int | None, args: argparse.Namespace) -> dict:
    cfg = MigrationConfig(
        channels=channels,
        compression=method,
        compression_level=level,
        start_method=args.start_method,
        verify=not args.no_verify,
    )
    with GuestRAM.create({b.name: b.size for b in src.blocks}) as dst:
        try:
            sampler = Sampler(
                args.interval, {"source": region_paths(src), "destination": region_paths(dst)}, args.sampler
            )
            sampler.start()
            try:
                with (
                    RemoteDestination(dst.name, cfg, start_method=args.start_method) as dest,
                    Source(src, cfg) as source,
                ):
                    t0 = time.perf_counter()
                    res = source.migrate(dest.address)
                    elapsed = time.perf_counter() - t0
                    sampler.sample(force=True)  # the end: workers are gone, the destination is committing
                    dest.result()
            finally:
                sampler.stop()
        finally:
            dst.unlink()
    roles = sampler.roles()
    procs = []
    for pid, rec in sampler.records.items():
        procs.append({
            "pid": pid,
            "ppid": rec.ppid,
            "role": roles[pid],
            "cmd": rec.cmd[:120],
            "smaps_samples": rec.samples,
            "status_samples": rec.status_samples,
            "status_peak_kib": rec.status_peak,
            "seen_s": [round(rec.first_seen, 3), round(rec.last_seen, 3)],
            "peak_kib": {**rec.peak, "rss": max(rec.peak["rss"], rec.status_peak.get("VmRSS", 0))},
            "final_kib": rec.final,
            "top_at_peak_kib": rec.top,
        })
    return {
        "time": elapsed,
        "setup": res.setup_time,
        "wire": res.transferred,
        "samples": len(sampler.durations),
        "smaps_reads": sampler.smaps_reads,
        "sample_ms_median": 1000 * statistics.median(sampler.durations),
        "sample_ms_max": 1000 * max(sampler.durations),
        "sampler_cpu_s": sampler.cpu,
        "processes": procs,
    }


def summarize(run: dict) -> dict:
    """Per role: the worst process (largest peak priv+anon) and the largest of each figure."""
    out = {}
    for role in ROLES + ("helper",):
        ps = [p for p in run["processes"] if p["role"] == role]
        if not ps:
            continue
        worst = max(ps, key=lambda p: p["peak_kib"]["priv_anon"])
        out[role] = {
            "n": len(ps),
            **{f"peak_{k}": max(p["peak_kib"][k] for p in ps) / 1024 for k in ProcessRecord.METRICS},
            **{f"final_{k}": max(p["final_kib"][k] for p in ps) / 1024 for k in ProcessRecord.METRICS},
            "worst_pid": worst["pid"],
            "worst_top": worst["top_at_peak_kib"],
        }
    return out


# --------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=parse_size("1G"), help="region size (default 1G)")
    p.add_argument("--channels", default="1,2,4,8", help="channel counts (default 1,2,4,8)")
    p.add_argument(
        "--content", default="random,half-zero", help=f"any of {', '.join(CONTENTS)} (default random,half-zero)"
    )
    p.add_argument("--compression", default="none,zstd",
                   help="methods, NAME or NAME:LEVEL (default none,zstd: zstd at its default level 3)")
    p.add_argument("--runs", type=int, default=3, help="migrations per configuration (default 3)")
    p.add_argument("--interval", type=float, default=0.05, help="seconds between samples (default 0.05)")
    p.add_argument("--sampler", choices=("full", "growth"), default="full",
                   help="full: smaps of every process every sample (default); growth: status every sample, "
                        "smaps of a process only when its RssAnon+RssFile grew by 512 KiB (far cheaper)")
    p.add_argument("--start-method", default="forkserver")
    p.add_argument("--no-verify", action="store_true", help="no fingerprint comparison at switchover")
    p.add_argument("--target", type=float, default=TARGET_MIB, help="per-worker MiB target (default 48)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the tables")
    args = p.parse_args()
    channels = [int(c) for c in args.channels.split(",") if c]
    contents = [c for c in args.content.split(",") if c]
    for c in contents:
        if c not in CONTENTS:
            p.error(f"content {c!r} not in {CONTENTS}")
    methods = [(m.split(":")[0], int(m.split(":")[1]) if ":" in m else None) for m in args.compression.split(",") if m]
    if args.runs < 1:
        p.error("--runs must be at least 1")

    # every segment of this run carries a prefix of its own, so leftovers are easy to see
    prefix = f"mpmmem{os.getpid()}_"
    os.environ["MPMULTIFD_SHM_PREFIX"] = prefix
    signal.signal(signal.SIGTERM, raise_interrupt)  # the finally blocks must run on SIGTERM as on Ctrl-C
    out = print if not args.json else log
    header = {
        **machine_header(),
        "size": args.size,
        "start_method": args.start_method,
        "verify": not args.no_verify,
        "interval": args.interval,
        "sampler": args.sampler,
        "target_mib": args.target,
    }
    out(f"# command: {header['command']}")
    out(f"# machine: nproc {header['nproc']}, Python {header['python']}, Linux {header['kernel']}, "
        f"load average {header['load_average_at_start']:.2f} at start")
    t_start = time.monotonic()
    from bench import warm_up  # here, not at the top: forkserver workers re-import this script

    runs: dict[tuple, list[dict]] = {}
    try:
        warm_up(2 * args.size)
        for content in contents:
            with GuestRAM.create({"ram": args.size}) as src:
                try:
                    fill(src, content, seed=7)
                    for r in range(args.runs):
                        for name, level in methods:
                            for ch in channels:
                                got = migrate_once(src, ch, name, level, args)
                                key = (content, name if level is None else f"{name}:{level}", ch)
                                runs.setdefault(key, []).append(got)
                                s = summarize(got)
                                log(
                                    f"#   run {r + 1}/{args.runs} {content} {key[1]} {ch} ch: {got['time']:.2f} s, "
                                    f"{got['samples']} samples ({got['sample_ms_median']:.1f} ms each, "
                                    f"{got['smaps_reads']} smaps reads, sampler CPU {got['sampler_cpu_s']:.2f} s), "
                                    "peak priv+anon "
                                    + ", ".join(
                                        f"{role} {s[role]['peak_priv_anon']:.1f}" for role in ROLES if role in s
                                    )
                                    + " MiB"
                                )
                finally:
                    src.unlink()
    except BaseException as e:
        if not caused_by_interrupt(e):
            raise
        log(f"# interrupted ({e}): shared memory and child processes cleaned up")
        return 130
    finally:
        report_leftovers(prefix)

    rows = []
    for (content, method, ch), rs in runs.items():
        sums = [summarize(r) for r in rs]
        for role in ROLES + ("helper",):
            have = [s[role] for s in sums if role in s]
            if not have:
                continue
            med = {k: statistics.median(h[k] for h in have) for k in have[0] if k.startswith(("peak_", "final_"))}
            worst_run = max(have, key=lambda h: h["peak_priv_anon"])
            verdict = None
            if role in WORKER_ROLES:
                verdict = "pass" if med["peak_priv_anon"] <= args.target else "FAIL"
            rows.append({
                "content": content, "method": method, "channels": ch, "role": role,
                "processes": statistics.median(h["n"] for h in have), **med,
                "target": verdict, "top_at_peak": worst_run["worst_top"],
            })
    doc = {
        "header": header,
        "wall_time": time.monotonic() - t_start,
        "rows": rows,
        "runs": [{"content": k[0], "method": k[1], "channels": k[2], "runs": v} for k, v in runs.items()],
    }
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
        return 0

    flat = [r for rs in runs.values() for r in rs]
    all_ms = [r["sample_ms_median"] for r in flat]
    n_samples = [r["samples"] for r in flat]
    cpu_share = [r["sampler_cpu_s"] / r["time"] for r in flat]
    what = "smaps of every process" if args.sampler == "full" else "status of every process, smaps on growth"
    print(f"# {fmt_size(args.size)} region, start method {args.start_method}, verify {not args.no_verify}, "
          f"{args.runs} run(s) each (medians over runs of the worst process of each role); "
          f"{what} every {1000 * args.interval:.0f} ms from a thread in the coordinator "
          f"({min(n_samples)}-{max(n_samples)} samples per migration, median {statistics.median(all_ms):.1f} ms "
          f"per sample, sampler thread CPU = {100 * statistics.median(cpu_share):.0f}% of the migration time "
          f"(median); migration s median {statistics.median(r['time'] for r in flat):.2f})")
    print()
    print(f"MiB. priv+anon = Private_Clean + max(Private_Dirty, Anonymous) over mappings outside /dev/shm, the figure "
          f"checked against the target (per-worker <= {args.target:g} MiB beyond the shared region); private = "
          "Private_Clean + Private_Dirty of the same mappings; literal = Private_Clean + Private_Dirty + Anonymous "
          "(private anonymous pages twice); Rss/Pss = whole process; region = Rss of the guest-RAM "
          "segments; shm = Rss of other /dev/shm mappings (rings, maps). Target n/a: not a worker.")
    print()
    print("| role | content | method | ch | procs | peak priv+anon | final priv+anon | peak private | peak literal "
          "| peak Rss | peak Pss | peak region Rss | peak shm | target |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        if r["role"] == "helper":
            continue
        print(f"| {r['role']} | {r['content']} | {r['method']} | {r['channels']} | {r['processes']:g} "
              f"| {r['peak_priv_anon']:.1f} | {r['final_priv_anon']:.1f} | {r['peak_private']:.1f} "
              f"| {r['peak_literal']:.1f} "
              f"| {r['peak_rss']:.1f} | {r['peak_pss']:.1f} | {r['peak_region_rss']:.1f} | {r['peak_shm_other']:.1f} "
              f"| {r['target'] or 'n/a'} |")
    print()
    workers = [r for r in rows if r["role"] in WORKER_ROLES]
    if workers:
        print(f"Target per worker <= {args.target:g} MiB: "
              f"{sum(r['target'] == 'pass' for r in workers)} of {len(workers)} worker rows pass; worst "
              f"{max(r['peak_priv_anon'] for r in workers):.1f} MiB (by the literal sum, which counts private "
              f"anonymous pages twice: worst {max(r['peak_literal'] for r in workers):.1f} MiB, "
              f"{sum(r['peak_literal'] <= args.target for r in workers)} of {len(workers)} within the target).")
    coord = [r for r in rows if r["role"] == "coordinator"]
    if coord:
        print(
            f"Coordinator (this process, sampler thread included): peak priv+anon "
            f"{min(r['peak_priv_anon'] for r in coord):.1f}-{max(r['peak_priv_anon'] for r in coord):.1f} MiB, "
            f"peak private {min(r['peak_private'] for r in coord):.1f}-{max(r['peak_private'] for r in coord):.1f} MiB."
        )
    helpers = [r for r in rows if r["role"] == "helper"]
    if helpers:
        print(f"Helpers (forkservers, resource trackers; not in the table): {max(r['processes'] for r in helpers):g} "
              f"processes, each peak priv+anon up to {max(r['peak_priv_anon'] for r in helpers):.1f} MiB "
              f"(private up to {max(r['peak_private'] for r in helpers):.1f} MiB).")
    print()
    print("Where the priv+anon of the worst process went at its peak: KiB of priv+anon by mapping, largest first, "
          "with its private part in parentheses (the rest is anonymous memory shared copy-on-write, with the "
          "forkserver for a worker); per role and method, the configuration with the largest peak:")
    print()
    methods_seen = list(dict.fromkeys(r["method"] for r in rows))
    for role in ROLES:
        for method in methods_seen:
            cands = [r for r in rows if r["role"] == role and r["method"] == method]
            if not cands:
                continue
            worst = max(cands, key=lambda r: r["peak_priv_anon"])
            tops = ", ".join(f"{os.path.basename(p) or p} {both} ({private})"
                             for p, both, private in worst["top_at_peak"])
            print(f"- {role}, {method} ({worst['content']}, {worst['channels']} ch, "
                  f"{worst['peak_priv_anon']:.1f} MiB): {tops}")
    print()
    print(wall_time_line(doc["wall_time"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
