"""Handing a running Linux VM from one QEMU to another (mpmultifd.qemu), on this machine.

The guest (``tests/linux_guest.py``) keeps rewriting a file and checking the
md5 of another one, printing ``CHECK n OK`` on its serial console; the
handover must leave the destination guest printing on with growing ``n`` and
never ``BAD``. Both QEMUs run here with their own backend files, so every
byte of RAM the destination guest sees came through mpmultifd.

Skipped, with the Debian packages to install, where the guest cannot run.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpmultifd import ConfigError, MigrationConfig, MigrationError, qemu
from mpmultifd.errors import RemoteProtocolError

import linux_guest
from linux_guest import LinuxGuest

needs_guest = pytest.mark.skipif(linux_guest.missing() is not None, reason=str(linux_guest.missing()))

CONFIG = MigrationConfig(channels=2, downtime_limit=0.3, stall_downtime_limit=float("inf"), start_method="forkserver")


# --------------------------------------------------------------------------- the stream's framing


@given(st.lists(st.binary(min_size=1, max_size=70000), max_size=8))
def test_frames_carry_any_chunks_and_end_with_an_empty_one(chunks):
    """What the relay sends (length-prefixed chunks, then a 0-length frame) comes out chunk by chunk."""
    a, b = socket.socketpair()
    try:
        out: list[bytes] = []

        def reader():
            while True:
                data = qemu._recv_frame(b, "test")
                if not data:
                    return
                out.append(data)

        t = threading.Thread(target=reader)
        t.start()
        for c in chunks:
            a.sendall(qemu._FRAME.pack(len(c)) + c)
        a.sendall(qemu._FRAME.pack(0))
        t.join(10)
        assert out == chunks
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("raw", [b"\xff\xff\xff\xff", b"\x00\x00\x00\x05abc"])
def test_bad_frames_are_typed_errors(raw):
    a, b = socket.socketpair()
    try:
        a.sendall(raw)
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(MigrationError):  # too long: RemoteProtocolError; cut short: ChannelClosed
            qemu._recv_frame(b, "test")
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("payload", [b"[1, 2]", b"not json", b'{"no": "status"}'])
def test_a_message_that_is_not_one_is_refused(payload):
    a, b = socket.socketpair()
    try:
        a.sendall(qemu._FRAME.pack(len(payload)) + payload)
        with pytest.raises(RemoteProtocolError):
            qemu._recv_json(b, "test")
    finally:
        a.close()
        b.close()


# --------------------------------------------------------------------------- the guest and QMP


@needs_guest
@pytest.mark.timeout(120)
def test_linux_guest_checks_its_memory(tmp_path):
    with LinuxGuest(tmp_path) as guest:
        checks = guest.wait_checks(3, timeout=90)
        assert all(ok for _, ok in checks)
        assert [n for n, _ in checks] == list(range(len(checks)))
        assert guest.status() == "running"
        backends = qemu.shared_backends(guest.qmp)
        assert backends == [qemu.MemoryBackend("ram0", guest.mem_path, 256 << 20)]


@needs_guest
@pytest.mark.timeout(120)
def test_a_guest_without_a_shared_file_backend_is_refused(tmp_path):
    guest = LinuxGuest(tmp_path)
    argv = guest.argv()
    i = argv.index("-object")
    argv[i + 1] = "memory-backend-memfd,id=ram0,size=256M,share=on"
    with open(guest.log, "wb") as logf:
        guest.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                      start_new_session=True)
    try:
        guest.qmp = qemu.QMP(guest.qmp_path, guest.proc, guest.log)
        with pytest.raises(ConfigError, match="not file-backed"):
            qemu.shared_backends(guest.qmp)
    finally:
        guest.close()


@needs_guest
@pytest.mark.timeout(120)
def test_device_state_relay_local_handover(tmp_path):
    """Two QEMUs on one backend file: the relay alone (no RAM copy) moves the running guest."""
    with LinuxGuest(tmp_path, name="src") as src:
        src.wait_checks(2, timeout=90)
        with LinuxGuest(tmp_path, name="dst", incoming=True, mem_path=src.mem_path) as dst:
            qemu._set_capabilities(src.qmp, source=True)
            qemu._set_capabilities(dst.qmp, source=False)
            a, b = socket.socketpair()
            incoming = qemu._Incoming(dst.qmp, 30)
            out: dict = {}
            t = threading.Thread(target=lambda: out.update(n=incoming._relay(b, time.monotonic() + 30)))
            t.start()
            try:
                src.cmd("stop")
                last = src.last_check()
                sent = qemu._send_device_state(src.qmp, a, time.monotonic() + 30)
                t.join(30)
                assert out["n"] == sent > 0
                assert src.status() == "postmigrate"
                assert dst.status() == "paused"  # loaded, not started
                dst.cmd("cont")
                checks = dst.wait_checks(2, timeout=30)
                assert checks[0][0] == last + 1
            finally:
                a.close()
                b.close()
                t.join(30)


# --------------------------------------------------------------------------- real handovers


def _receive(dst: LinuxGuest, config: MigrationConfig, out: dict, ready: threading.Event, timeout: float) -> None:
    def listening(address):
        out["address"] = address
        ready.set()

    try:
        out["result"] = qemu.receive_vm(dst.agent_qmp_path, ("127.0.0.1", 0), config, on_listening=listening,
                                        timeout=timeout)
    except BaseException as exc:  # noqa: BLE001 - checked by the test
        out["error"] = exc
    finally:
        ready.set()


def handover(src: LinuxGuest, dst: LinuxGuest, config: MigrationConfig = CONFIG,
             dst_config: MigrationConfig | None = None, before=None, dst_timeout: float = 90.0):
    """Run receive_vm (a thread) and migrate_vm; returns (source outcome, destination outcome)."""
    out: dict = {}
    ready = threading.Event()
    t = threading.Thread(target=_receive, args=(dst, dst_config or config, out, ready, dst_timeout))
    t.start()
    try:
        assert ready.wait(60) and "address" in out, out.get("error")
        if before is not None:
            before()
        try:
            res = qemu.migrate_vm(src.agent_qmp_path, out["address"], config)
        except MigrationError as exc:
            res = exc
    finally:
        t.join(120)
    return res, out.get("result", out.get("error"))


@needs_guest
@pytest.mark.timeout(120)
def test_handover_of_a_running_linux_guest(tmp_path):
    with LinuxGuest(tmp_path, name="src") as src, LinuxGuest(tmp_path, name="dst", incoming=True) as dst:
        src.wait_checks(3, timeout=90)
        res, dres = handover(src, dst)
        assert isinstance(res, qemu.VMHandoverResult), res
        assert isinstance(dres, qemu.VMHandoverResult), dres
        last = src.last_check()
        assert src.status() == "postmigrate"
        checks = dst.wait_checks(5, timeout=60)  # BAD raises
        numbers = [n for n, _ in checks]
        assert numbers[0] == last + 1 and numbers == list(range(numbers[0], numbers[0] + len(numbers)))
        assert dst.status() == "running"
        assert res.downtime is not None and res.downtime > 0
        assert res.device_state_bytes == dres.device_state_bytes > 0
        assert res.repaired_pages == dres.repaired_pages and res.ram.verified and dres.ram.verified
        assert res.ram.status == "completed" and dres.ram.status == "completed"
        print(f"downtime {res.downtime * 1000:.0f} ms, total {res.total_time:.2f} s, rounds {res.ram.rounds}, "
              f"device state {res.device_state_bytes} B, repaired {res.repaired_pages} pages, phases {res.phases}")


@needs_guest
@pytest.mark.timeout(120)
def test_destination_qemu_gone_before_the_device_state_resumes_the_source(tmp_path):
    with LinuxGuest(tmp_path, name="src") as src, LinuxGuest(tmp_path, name="dst", incoming=True) as dst:
        src.wait_checks(2, timeout=90)
        res, dres = handover(src, dst, before=dst.kill)
        assert isinstance(res, qemu.VMHandoverError), res
        assert res.source_running is True and res.destination_started is False
        assert isinstance(dres, qemu.VMHandoverError), dres
        assert src.status() == "running"
        src.wait_checks(3, after=src.last_check(), timeout=30)
        assert not dst.alive()


@needs_guest
@pytest.mark.timeout(120)
def test_wrong_key_is_refused_and_the_source_keeps_running(tmp_path):
    with LinuxGuest(tmp_path, name="src") as src, LinuxGuest(tmp_path, name="dst", incoming=True) as dst:
        src.wait_checks(2, timeout=90)
        good = CONFIG.replace(auth_key=os.urandom(32), timeout=5.0)
        bad = CONFIG.replace(auth_key=os.urandom(32), timeout=5.0)
        res, dres = handover(src, dst, config=bad, dst_config=good, dst_timeout=10.0)
        assert isinstance(res, qemu.VMHandoverError), res
        assert res.source_running is True
        assert src.status() == "running"
        src.wait_checks(2, after=src.last_check(), timeout=30)
        assert dst.status() == "inmigrate"  # never loaded, never started
        assert isinstance(dres, qemu.VMHandoverError), dres


@needs_guest
@pytest.mark.timeout(120)
def test_commit_unknown_leaves_the_source_stopped_and_the_destination_runs(tmp_path, monkeypatch):
    """The connection breaks after COMMIT, before its acknowledgement: the source cannot know who owns
    the VM, so it stays stopped (CommitUnknown); the destination got COMMIT, so its VM runs. Never both."""
    from mpmultifd import destination as dmod
    from mpmultifd.errors import ChannelBroken, CommitUnknown

    real_send = dmod.Destination._send

    def lose_the_ack(self, msg):
        if isinstance(msg, dmod.CommitAck):
            self._control.shutdown(socket.SHUT_RDWR)
            raise ChannelBroken("the test broke the control connection before COMMIT_ACK")
        return real_send(self, msg)

    monkeypatch.setattr(dmod.Destination, "_send", lose_the_ack)
    with LinuxGuest(tmp_path, name="src") as src, LinuxGuest(tmp_path, name="dst", incoming=True) as dst:
        src.wait_checks(2, timeout=90)
        res, dres = handover(src, dst)
        assert isinstance(res, CommitUnknown), res
        assert isinstance(dres, qemu.VMHandoverResult), dres  # COMMIT arrived: the destination owns the VM
        last = src.last_check()
        assert src.status() != "running"
        checks = dst.wait_checks(3, after=last, timeout=60)
        assert [n for n, _ in checks if n > last][0] == last + 1
        assert dst.status() == "running"
        time.sleep(1.0)
        assert src.last_check() == last and src.status() != "running"


@needs_guest
@pytest.mark.timeout(120)
def test_cont_refused_after_commit_leaves_both_stopped_and_says_so(tmp_path, monkeypatch):
    """After COMMIT the source must not resume; if the destination QEMU then refuses cont, neither runs
    and both sides raise VMHandoverError saying so (the source's: source_running False)."""
    with LinuxGuest(tmp_path, name="src") as src, LinuxGuest(tmp_path, name="dst", incoming=True) as dst:
        real_cmd = qemu.QMP.cmd

        def refuse_cont(self, name, args=None, timeout=30.0):
            if name == "cont" and self.path == dst.agent_qmp_path:
                raise qemu.QMPError("QMP cont {}: refused by the test")
            return real_cmd(self, name, args, timeout)

        monkeypatch.setattr(qemu.QMP, "cmd", refuse_cont)
        src.wait_checks(2, timeout=90)
        res, dres = handover(src, dst)
        assert isinstance(res, qemu.VMHandoverError), res
        assert res.source_running is False and "stays stopped" in str(res)
        assert isinstance(dres, qemu.VMHandoverError) and "cont failed" in str(dres), dres
        assert src.status() == "postmigrate"
        assert dst.status() == "paused"


@needs_guest
@pytest.mark.timeout(150)
def test_cli_vm_recv_and_vm_send(tmp_path):
    """The two verbs as processes, one port between them, a key file: exit 0 both, the guest continues."""
    import json
    import subprocess
    import sys

    key = tmp_path / "key"
    key.write_bytes(os.urandom(32).hex().encode())
    common = ["--channels", "2", "--stall-downtime-limit", "10", "--auth-key-file", str(key), "--json"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    with LinuxGuest(tmp_path, name="src") as src, LinuxGuest(tmp_path, name="dst", incoming=True) as dst:
        src.wait_checks(2, timeout=90)
        recv = subprocess.Popen(
            [sys.executable, "-m", "mpmultifd", "vm-recv", "--qmp", dst.agent_qmp_path, "--listen", "127.0.0.1:0",
             "--wait", "100", *common],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        try:
            first = json.loads(recv.stdout.readline())
            assert first["event"] == "listening", first
            send = subprocess.run(
                [sys.executable, "-m", "mpmultifd", "vm-send", "--qmp", src.agent_qmp_path, first["address"],
                 *common],
                capture_output=True, text=True, env=env, timeout=100,
            )
            out, err = recv.communicate(timeout=60)
        finally:
            if recv.poll() is None:
                recv.kill()
                recv.wait(10)
        assert send.returncode == 0, (send.stdout[-2000:], send.stderr[-2000:])
        assert recv.returncode == 0, (out[-2000:], err[-2000:])
        sres = json.loads(send.stdout.strip().splitlines()[-1])
        rres = json.loads(out.strip().splitlines()[-1])
        assert sres["status"] == rres["status"] == "completed"
        assert sres["device-state-bytes"] == rres["device-state-bytes"] > 0
        assert sres["downtime"] > 0 and sres["ram"]["verified"] is True
        last = src.last_check()
        assert src.status() == "postmigrate"
        checks = dst.wait_checks(3, after=last, timeout=60)
        assert [n for n, _ in checks if n > last][0] == last + 1
