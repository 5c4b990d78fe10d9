"""The command line as an operator meets it: --keep, signals, units, errors, help."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpmultifd import GuestRAM, MigrationConfig, Source
from mpmultifd.cli import parse_duration, parse_rate, parse_size
from mpmultifd.testing import fill

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpmultifd", *args], env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def popen_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mpmultifd", *args], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _shm_entries() -> set[str]:
    prefix = os.environ["MPMULTIFD_SHM_PREFIX"]
    return {n for n in os.listdir("/dev/shm") if n.startswith(prefix)}


def _finish(*procs: subprocess.Popen | None) -> None:
    for p in procs:
        if p is not None and p.poll() is None:
            p.kill()
        if p is not None:
            p.communicate()


def _check_kept(region: str, expected: GuestRAM, before: set[str]) -> None:
    """Another process attaches to the kept region by name and finds the bytes; then the files go."""
    left = _shm_entries() - before
    try:
        assert left, "the kept region's segments are gone"
        attached = GuestRAM.attach(region)
        try:
            assert all(np.array_equal(expected.view(b.name), attached.view(b.name)) for b in expected.blocks)
        finally:
            attached.close()
    finally:
        for name in left:
            os.unlink(os.path.join("/dev/shm", name))


# ----------------------------------------------------------------------------- --keep


def test_recv_create_keep_leaves_the_region_for_another_process():
    with GuestRAM.create({"pc.ram": 4 << 20, "vga": 1 << 20}) as s:
        fill(s, "random", 11)
        before = _shm_entries()
        recv = popen_cli("recv", "--listen", "127.0.0.1:0", "--create", "pc.ram=4M,vga=1M", "--keep", "--json",
                         "--channels", "2")
        try:
            listening = json.loads(recv.stdout.readline())
            sent = run_cli("send", listening["address"], "--region", s.name, "--channels", "2", "--no-progress")
            assert sent.returncode == 0, sent.stderr
            out, err = recv.communicate(timeout=60)
            assert recv.returncode == 0, err
            assert "leaked" not in err
        finally:
            _finish(recv)
        _check_kept(listening["region"], s, before)


def test_restore_create_keep_leaves_the_region_for_another_process(tmp_path):
    path = str(tmp_path / "vm.mpsave")
    with GuestRAM.create({"pc.ram": 4 << 20}) as s:
        fill(s, "half-zero", 12)
        with Source(s, MigrationConfig(channels=2)) as src:
            src.save(path)
        before = _shm_entries()
        proc = run_cli("restore", path, "--create", "pc.ram=4M", "--keep", "--json", "--channels", "2")
        assert proc.returncode == 0, proc.stderr
        assert "leaked" not in proc.stderr
        restored = json.loads(proc.stdout.splitlines()[0])
        _check_kept(restored["region"], s, before)


# ----------------------------------------------------------------------------- signals, --pause-cmd-timeout, --max-time


def _read_events(proc: subprocess.Popen, until: Callable[[dict], bool]) -> list[dict]:
    seen = []
    while True:
        line = proc.stdout.readline()
        assert line, f"ended early: {proc.communicate()}"
        ev = json.loads(line)
        seen.append(ev)
        if until(ev):
            return seen


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_signal_while_paused_cancels_resumes_and_exits_128_plus_signal(tmp_path, sig):
    paused, go, resumed = tmp_path / "paused", tmp_path / "go", tmp_path / "resumed"
    pause_cmd = f"touch {paused}; while [ ! -e {go} ]; do sleep 0.05; done"
    with GuestRAM.create({"a": 8 << 20}) as s, GuestRAM.create({"a": 8 << 20}) as d:
        fill(s, "mixed", 7)
        recv = popen_cli("recv", "--listen", "127.0.0.1:0", "--region", d.name, "--json")
        send = None
        try:
            addr = json.loads(recv.stdout.readline())["address"]
            send = popen_cli("send", addr, "--region", s.name, "--json", "--no-progress",
                             "--pause-cmd", pause_cmd, "--resume-cmd", f"touch {resumed}")
            _read_events(send, lambda ev: ev.get("status") == "active")
            while not paused.exists():  # the guest is paused now
                assert send.poll() is None, send.communicate()
                time.sleep(0.02)
            send.send_signal(sig)
            time.sleep(0.2)
            go.touch()  # the pause command returns; the migration must still end cancelled
            out, err = send.communicate(timeout=60)
            assert send.returncode == 128 + sig, (out, err)
            assert resumed.exists(), "--resume-cmd did not run"
            assert json.loads(out.strip().splitlines()[-1])["status"] == "cancelled"
            assert "Traceback" not in err and err.count("cancelled") == 1, err
            assert json.loads(recv.stdout.readline())["status"] == "cancelled"
            assert recv.wait(30) == 130
        finally:
            _finish(recv, send)


def test_sighup_cancels_a_waiting_recv():
    with GuestRAM.create({"a": 1 << 20}) as d:
        recv = popen_cli("recv", "--listen", "127.0.0.1:0", "--region", d.name, "--json")
        try:
            json.loads(recv.stdout.readline())
            recv.send_signal(signal.SIGHUP)
            out, err = recv.communicate(timeout=30)
            assert recv.returncode == 128 + signal.SIGHUP, err
            assert json.loads(out.strip().splitlines()[-1])["status"] == "cancelled"
            assert "Traceback" not in err
        finally:
            _finish(recv)


def test_pause_cmd_that_overruns_fails_the_migration_and_resumes(tmp_path):
    resumed = tmp_path / "resumed"
    with GuestRAM.create({"a": 4 << 20}) as s, GuestRAM.create({"a": 4 << 20}) as d:
        fill(s, "mixed", 8)
        recv = popen_cli("recv", "--listen", "127.0.0.1:0", "--region", d.name, "--json")
        try:
            addr = json.loads(recv.stdout.readline())["address"]
            sent = run_cli("send", addr, "--region", s.name, "--json", "--no-progress", "--pause-cmd", "sleep 60",
                           "--pause-cmd-timeout", "500ms", "--resume-cmd", f"touch {resumed}")
            assert sent.returncode == 1, sent.stderr
            result = json.loads(sent.stdout.strip().splitlines()[-1])
            assert result["status"] == "failed" and "--pause-cmd" in result["error"], result
            assert resumed.exists()
            assert sent.stderr.count("migration failed") == 1 and "Traceback" not in sent.stderr, sent.stderr
            recv.communicate(timeout=30)
            assert recv.returncode != 0
        finally:
            _finish(recv)


def test_max_time_cancels_and_fails_cleanly():
    size = 64 << 20
    with GuestRAM.create({"a": size}) as s, GuestRAM.create({"a": size}) as d:
        fill(s, "random", 9)
        recv = popen_cli("recv", "--listen", "127.0.0.1:0", "--region", d.name, "--json")
        try:
            addr = json.loads(recv.stdout.readline())["address"]
            # 64 MiB at 8 MiB/s takes 8 s: far beyond --max-time
            sent = run_cli("send", addr, "--region", s.name, "--json", "--no-progress", "--max-bandwidth", "8M/s",
                           "--max-time", "1s")
            assert sent.returncode == 124, sent.stderr
            result = json.loads(sent.stdout.strip().splitlines()[-1])
            assert result["status"] == "failed" and "--max-time" in result["error"]
            assert result["query"]["status"] == "cancelled"
            assert json.loads(recv.stdout.readline())["status"] == "cancelled"
            recv.wait(30)
        finally:
            _finish(recv)


# ----------------------------------------------------------------------------- units and JSON


def test_send_json_times_are_seconds_and_keys_kebab_case():
    with GuestRAM.create({"a": 4 << 20}) as s, GuestRAM.create({"a": 4 << 20}) as d:
        fill(s, "mixed", 10)
        recv = popen_cli("recv", "--listen", "127.0.0.1:0", "--region", d.name, "--json")
        try:
            addr = json.loads(recv.stdout.readline())["address"]
            sent = run_cli("send", addr, "--region", s.name, "--json", "--no-progress", "--downtime-limit", "250ms",
                           "--handshake-timeout", "20s")
            assert sent.returncode == 0, sent.stderr
            result = json.loads(sent.stdout.strip().splitlines()[-1])
            q = result["query"]
            # seconds on both (milliseconds would be a thousand times larger); not a timing check
            assert 0.5 * result["total-time"] <= q["total-time"] <= 2 * result["total-time"] + 1
            assert 0.5 * result["downtime"] <= q["downtime"] <= 2 * result["downtime"] + 1
            assert q["parameters"]["downtime-limit"] == pytest.approx(0.25)
            assert q["config"]["downtime-limit"] == pytest.approx(0.25)
            assert q["config"]["timeout"] == pytest.approx(20.0)

            def keys(obj):
                if isinstance(obj, dict):
                    for k, v in obj.items():
                        yield k
                        yield from keys(v)
                elif isinstance(obj, list):
                    for v in obj:
                        yield from keys(v)

            for line in sent.stdout.strip().splitlines():
                assert not [k for k in keys(json.loads(line)) if "_" in k], line
            recv.communicate(timeout=30)
        finally:
            _finish(recv)


def test_downtime_limit_without_a_unit_in_qemu_milliseconds_is_refused():
    proc = run_cli("check", "--downtime-limit", "300")
    assert proc.returncode == 2
    assert "300ms" in proc.stderr and "Traceback" not in proc.stderr


def test_old_timeout_flag_still_works_and_warns():
    proc = run_cli("check", "--timeout", "5", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "deprecated" in proc.stderr and "--handshake-timeout" in proc.stderr


@given(st.integers(0, 10**6), st.sampled_from([("us", 1e-6), ("ms", 1e-3), ("s", 1.0), ("m", 60.0), ("h", 3600.0)]))
def test_parse_duration_units(n, unit):
    suffix, factor = unit
    assert parse_duration(f"{n}{suffix}") == pytest.approx(n * factor)
    assert parse_duration(f"{n} {suffix.upper()}") == pytest.approx(n * factor)


@given(st.integers(0, 10**6), st.sampled_from([("", 1), ("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)]),
       st.sampled_from(["", "/s", "B/s", "iB/s"]))
def test_parse_rate_units(n, unit, tail):
    suffix, factor = unit
    if tail.startswith("i") and not suffix:
        tail = "/s"
    assert parse_rate(f"{n}{suffix}{tail}") == n * factor


@given(st.text(max_size=12))
def test_parsers_reject_garbage_with_argument_errors(text):
    import argparse

    for parse in (parse_duration, parse_rate, parse_size):
        try:
            parse(text)
        except argparse.ArgumentTypeError:
            pass


# ----------------------------------------------------------------------------- errors and help


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_port_in_use_is_one_line():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        _one_line_error(run_cli("recv", "--listen", f"127.0.0.1:{port}", "--create", "a=1M"), "--listen", "in use")


def test_missing_region_key_tls_and_bad_size_are_one_line(tmp_path):
    _one_line_error(run_cli("send", "127.0.0.1:1", "--region", "mpm_no_such_region"), "--region", "no region")
    with GuestRAM.create({"a": 1 << 20}) as s:
        _one_line_error(run_cli("send", "127.0.0.1:1", "--region", s.name, "--auth-key-file", str(tmp_path / "nokey")),
                        "--auth-key-file")
        _one_line_error(run_cli("send", "127.0.0.1:1", "--region", s.name, "--tls-ca", str(tmp_path / "ca.pem")),
                        "--tls-ca")
    _one_line_error(run_cli("recv", "--listen", "127.0.0.1:0", "--create", "a=1M", "--tls-cert", str(tmp_path / "c"),
                            "--tls-key", str(tmp_path / "k")), "--tls-cert")
    _one_line_error(run_cli("recv", "--listen", "127.0.0.1:0", "--create", "a=1X"), "--create", "1X")
    _one_line_error(run_cli("send", "127.0.0.1:1", "--file", f"a={tmp_path / 'nofile'}"), "--file", "nofile")


def test_restore_of_a_missing_file_is_one_line():
    proc = run_cli("restore", "/nonexistent/vm.mpsave", "--create", "a=1M")
    _one_line_error(proc, "/nonexistent/vm.mpsave")
    assert "cancelled" not in proc.stderr


def test_keyless_listener_beyond_loopback_names_flags():
    proc = run_cli("recv", "--listen", "0.0.0.0:0", "--create", "a=1M")
    _one_line_error(proc, "--auth-key-file", "--allow-unauthenticated")
    assert "auth_key" not in proc.stderr and "allow_unauthenticated" not in proc.stderr


def test_a_failed_migration_says_so_once():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens here once closed
    with GuestRAM.create({"a": 1 << 20}) as r:
        proc = run_cli("send", f"127.0.0.1:{port}", "--region", r.name, "--no-progress")
    _one_line_error(proc, "migration failed")


def test_a_bad_configuration_names_the_flag():
    proc = run_cli("check", "--zerocopy", "on", "--compression", "zstd")
    assert proc.returncode == 1
    assert "--zerocopy" in proc.stdout and "zero_page" not in proc.stdout


def _subparsers():
    import argparse

    from mpmultifd.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, action.choices


def test_every_flag_has_help_and_demo_shows_no_network_flags():
    import argparse

    parser, subs = _subparsers()
    for name, sub in subs.items():
        for action in sub._actions:
            if action.help == argparse.SUPPRESS:
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    demo = {o for a in subs["demo"]._actions for o in a.option_strings}
    assert not {"--tls-cert", "--tls-ca", "--auth-key-file", "--listen", "--allow-unauthenticated"} & demo
    recv = {o for a in subs["recv"]._actions for o in a.option_strings}
    assert "--tls-cert" in recv and "--tls-ca" not in recv and "--compression" not in recv
    send = {o for a in subs["send"]._actions for o in a.option_strings}
    assert "--tls-ca" in send and "--tls-cert" not in send and "--max-time" in send


def test_restore_help_names_real_commands():
    proc = run_cli("restore", "--help")
    assert proc.returncode == 0
    assert "send --top-up" not in proc.stdout and "save --top-up-to" in proc.stdout


def test_version():
    import mpmultifd

    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"mpmultifd {mpmultifd.__version__}"


def test_cli_and_api_default_channels_agree():
    _, subs = _subparsers()
    for name in ("demo", "send", "save", "check", "recv", "restore"):
        assert subs[name].get_default("channels") == MigrationConfig().channels, name


def test_readme_lists_every_subcommand():
    _, subs = _subparsers()
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    for name in subs:
        assert f"mpmultifd {name}" in readme, name


def test_library_messages_in_flag_words():
    from mpmultifd.cli import _flag_words

    assert _flag_words("downtime_limit: 0 is not a positive number") == "--downtime-limit: 0 is not a positive number"
    assert _flag_words("opt out with allow_unauthenticated=True") == "opt out with --allow-unauthenticated"
    assert _flag_words("(verify=False or a cheaper tracker can)") == "(--no-verify or a cheaper tracker can)"
    assert _flag_words("3 channels on 2 CPUs") == "3 channels on 2 CPUs"  # plain words stay
    assert _flag_words("zerocopy: 'on' needs compression='none'") == "--zerocopy: 'on' needs --compression='none'"
