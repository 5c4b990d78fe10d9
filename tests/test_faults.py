"""Failure and cancel: every end is bounded in time, typed, leaves nothing behind, and leaves the source intact."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from mpmultifd import (
    ChannelError,
    Destination,
    GuestRAM,
    MigrationCancelled,
    MigrationConfig,
    MigrationError,
    Source,
    WorkerDied,
    auth,
)
from mpmultifd.testing import DirtyingWriter, RemoteDestination, fill
from mpmultifd.wire import (
    CONTROL_CHANNEL,
    FLAG_SYNC,
    KIND_CONTROL,
    KIND_DATA,
    BlockSpec,
    Config,
    ConfigAck,
    ControlDecoder,
    DataHeaderEncoder,
    Hello,
    encode_control,
    encode_hello,
)

SIZE = 192 << 20
BOUND = 15.0  # seconds any failure may take to end both sides (timeout is 3 s in these tests)


def cfg(**kw):
    # forkserver: with fork, workers of a Source and a Destination in one process
    # inherit each other's sockets, which keeps a dead peer's connection open
    base = dict(channels=2, start_method="forkserver", timeout=3.0, verify=False)
    base.update(kw)
    return MigrationConfig(**base)


class Runner:
    """Runs src.migrate in a thread and records how it ended."""

    def __init__(self, src: Source, address, **kw):
        self.result = None
        self.error: BaseException | None = None
        self.ended_at: float | None = None
        self.thread = threading.Thread(target=self._run, args=(src, address), kwargs=kw)
        self.thread.start()

    def _run(self, src, address, **kw):
        try:
            self.result = src.migrate(address, **kw)
        except BaseException as e:
            self.error = e
        finally:
            self.ended_at = time.monotonic()

    def join(self, timeout=BOUND):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "migrate() did not end in time"


def wait_for(pred, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def reap_killed_destination_segments(before: set[str]) -> None:
    """Remove what a SIGKILLed destination process could not: its resource tracker is this test
    process's (multiprocessing children share it), which cleans up only when this process exits."""
    prefix = os.environ["MPMULTIFD_SHM_PREFIX"]
    for name in set(os.listdir("/dev/shm")) - before:
        if name.startswith(prefix + "rcv_") or name.startswith(prefix + "rst_"):
            os.unlink(os.path.join("/dev/shm", name))


def moving(src: Source) -> bool:
    return src.query()["ram"]["transferred"] > (1 << 20)


# ----------------------------------------------------------------------------- killed processes


def test_sigkill_source_worker():
    with GuestRAM.create({"a": SIZE}) as s, GuestRAM.create({"a": SIZE}) as d:
        fill(s, "random", 1)
        before = s.view(0).copy()
        with RemoteDestination(d.name, cfg(), start_method="fork") as dest, Source(s, cfg()) as src:
            resumes = []
            run = Runner(src, dest.address, resume=lambda: resumes.append(1))
            wait_for(lambda: moving(src) or run.ended_at, what="bytes to move")
            victim = src._channels[1].proc.pid
            t0 = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            run.join()
            assert isinstance(run.error, WorkerDied), run.error
            assert run.error.channel == 1
            assert run.ended_at - t0 < BOUND
            assert src.status == "failed"
            assert resumes == []  # never paused, so never resumed
            with pytest.raises(MigrationError):
                dest.result(BOUND)
            assert dest.valid is False
        assert np.array_equal(s.view(0), before)  # the source region is untouched


def test_sigkill_destination_worker():
    with GuestRAM.create({"a": SIZE}) as s, GuestRAM.create({"a": SIZE}) as d:
        fill(s, "random", 2)
        with Destination(d, config=cfg()) as dst, Source(s, cfg()) as src:
            run = Runner(src, dst.address)
            wait_for(lambda: moving(src) or run.ended_at, what="bytes to move")
            t0 = time.monotonic()
            os.kill(dst._receivers[0].proc.pid, signal.SIGKILL)
            with pytest.raises(WorkerDied) as ei:
                dst.wait(BOUND)
            assert ei.value.channel == 0
            run.join()
            assert isinstance(run.error, MigrationError), run.error
            assert run.ended_at - t0 < BOUND
            assert not dst.valid and dst.status == "failed"


def test_sigkill_whole_destination_process():
    shm_before = set(os.listdir("/dev/shm"))
    with GuestRAM.create({"a": SIZE}) as s, GuestRAM.create({"a": SIZE}) as d:
        fill(s, "random", 3)
        # a writer and a tiny downtime limit keep the migration going round after round,
        # so the kill lands mid-migration however fast this machine is today
        busy = cfg(downtime_limit=0.0001, max_rounds=1000, stall_rounds=1000)
        with RemoteDestination(d.name, cfg(), start_method="fork") as dest, DirtyingWriter(
            s.name, rate=20000, start_method="fork"
        ) as writer, Source(s, busy) as src:
            run = Runner(src, dest.address, pause=writer.pause)
            wait_for(lambda: src.query()["rounds"] >= 1 or run.ended_at, what="a second round")
            t0 = time.monotonic()
            os.kill(dest._proc.pid, signal.SIGKILL)
            run.join()
            reap_killed_destination_segments(shm_before)
            assert isinstance(run.error, (ChannelError, MigrationError)), run.error
            assert run.ended_at - t0 < BOUND
            assert src.status == "failed"


SOURCE_SCRIPT = textwrap.dedent(
    """
    import sys
    from mpmultifd import GuestRAM, MigrationConfig, Source
    from mpmultifd.testing import fill
    host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with GuestRAM.create({"a": size}) as ram:
        fill(ram, "random", 4)
        print("ready", flush=True)
        with Source(ram, MigrationConfig(channels=2, start_method="fork", timeout=3.0, verify=False)) as src:
            src.migrate((host, port))
    """
)


def test_kill_source_process_under_destination():
    env = dict(os.environ)
    env["PYTHONPATH"] = (
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.pathsep + env.get("PYTHONPATH", "")
    )
    with GuestRAM.create({"a": SIZE}) as d:
        with Destination(d, config=cfg()) as dst:
            proc = subprocess.Popen(
                [sys.executable, "-c", SOURCE_SCRIPT, dst.address[0], str(dst.address[1]), str(SIZE)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            try:
                assert proc.stdout.readline().strip() == b"ready"
                wait_for(lambda: dst.query()["ram"]["transferred"] > (1 << 20) or proc.poll() is not None, 30)
                t0 = time.monotonic()
                proc.kill()
                with pytest.raises(ChannelError):
                    dst.wait(BOUND)
                assert time.monotonic() - t0 < BOUND
                assert dst.valid is False and dst.status == "failed"
            finally:
                proc.kill()
                proc.wait()
                proc.stdout.close()


class FakeDestination:
    """Admits connections and acknowledges the configuration, then reads nothing (or never greets)."""

    def __init__(self, *, greet: bool = True):
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.address = self.lsock.getsockname()
        self.greet = greet
        self.conns: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve)
        self.thread.start()

    def _serve(self):
        self.lsock.settimeout(0.1)
        while not self.stop.is_set():
            try:
                c, _ = self.lsock.accept()
            except OSError:
                continue
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            self.conns.append(c)
            if not self.greet:
                continue
            c.sendall(auth.encode_greeting(auth.Greeting(False, auth.new_nonce())))
            hello = c.recv(32, socket.MSG_WAITALL)
            c.sendall(auth.encode_welcome())
            if hello[6] == KIND_CONTROL:
                d = ControlDecoder()
                while d.next_message() is None:
                    d.feed(c.recv(65536))
                c.sendall(encode_control(ConfigAck()))

    def close(self):
        self.stop.set()
        self.thread.join()
        for c in self.conns:
            c.close()
        self.lsock.close()


def test_destination_that_stops_reading_fails_the_source_in_bounded_time():
    fake = FakeDestination()
    try:
        with GuestRAM.create({"a": 64 << 20}) as s:
            fill(s, "random", 5)
            with Source(s, cfg(timeout=2.0)) as src:
                t0 = time.monotonic()
                with pytest.raises(ChannelError, match="no progress|timed out"):
                    src.migrate(fake.address)
                assert time.monotonic() - t0 < 2.0 + BOUND
                assert src.status == "failed"
    finally:
        fake.close()


def test_pause_then_failure_calls_resume_once():
    shm_before = set(os.listdir("/dev/shm"))
    with GuestRAM.create({"a": 32 << 20}) as s, GuestRAM.create({"a": 32 << 20}) as d:
        fill(s, "random", 6)
        with RemoteDestination(d.name, cfg(), start_method="fork") as dest, Source(s, cfg()) as src:
            calls = []

            def pause():
                calls.append("pause")
                os.kill(dest._proc.pid, signal.SIGKILL)  # the destination dies during the final round

            with pytest.raises(MigrationError):
                src.migrate(dest.address, pause=pause, resume=lambda: calls.append("resume"))
            reap_killed_destination_segments(shm_before)
            assert calls == ["pause", "resume"]
            assert src.status == "failed"


# ----------------------------------------------------------------------------- cancel


def test_cancel_before_migrate():
    with GuestRAM.create({"a": 1 << 20}) as s, Source(s, cfg()) as src:
        src.cancel()
        src.cancel()  # idempotent
        with pytest.raises(MigrationCancelled):
            src.migrate(("127.0.0.1", 9))
        assert src.status == "cancelled"


def test_cancel_during_setup_interrupts_a_silent_handshake():
    fake = FakeDestination(greet=False)
    try:
        with GuestRAM.create({"a": 1 << 20}) as s, Source(s, cfg(timeout=30.0)) as src:
            run = Runner(src, fake.address)
            time.sleep(0.3)
            assert src.status == "setup"
            t0 = time.monotonic()
            src.cancel()
            run.join(5)
            assert isinstance(run.error, MigrationCancelled), run.error
            assert run.ended_at - t0 < 2.0
            assert src.status == "cancelled"
    finally:
        fake.close()


def test_cancel_mid_round_cancels_both_ends():
    with GuestRAM.create({"a": SIZE}) as s, GuestRAM.create({"a": SIZE}) as d:
        fill(s, "random", 7)
        with Destination(d, config=cfg()) as dst, Source(s, cfg()) as src:
            run = Runner(src, dst.address)
            wait_for(lambda: moving(src) or run.ended_at, what="bytes to move")
            t0 = time.monotonic()
            src.cancel()
            run.join(5)
            assert isinstance(run.error, MigrationCancelled), run.error
            assert run.ended_at - t0 < 3.0
            with pytest.raises(MigrationCancelled):
                dst.wait(5)
            assert src.status == "cancelled" and dst.status == "cancelled" and not dst.valid


def test_cancel_during_final_round_resumes_the_guest():
    with GuestRAM.create({"a": 8 << 20}) as s, GuestRAM.create({"a": 8 << 20}) as d:
        fill(s, "random", 8)
        with Destination(d, config=cfg()) as dst, Source(s, cfg()) as src:
            calls = []

            def pause():
                calls.append("pause")
                src.cancel()

            with pytest.raises(MigrationCancelled):
                src.migrate(dst.address, pause=pause, resume=lambda: calls.append("resume"))
            assert calls == ["pause", "resume"]
            with pytest.raises(MigrationCancelled):
                dst.wait(5)


def test_cancel_from_a_signal_handler():
    with GuestRAM.create({"a": SIZE}) as s, GuestRAM.create({"a": SIZE}) as d:
        fill(s, "random", 9)
        with RemoteDestination(d.name, cfg(), start_method="fork") as dest, Source(s, cfg()) as src:
            previous = signal.signal(signal.SIGALRM, lambda *a: src.cancel())
            signal.setitimer(signal.ITIMER_REAL, 0.15)
            try:
                with pytest.raises(MigrationCancelled):
                    src.migrate(dest.address)  # the main thread runs the migration and takes the signal
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
            with pytest.raises(MigrationCancelled):
                dest.result(10)


def test_destination_cancel_before_any_connection():
    with GuestRAM.create({"a": 1 << 20}) as d, Destination(d, config=cfg()) as dst:
        t0 = time.monotonic()
        dst.cancel()
        dst.cancel()
        with pytest.raises(MigrationCancelled):
            dst.wait(5)
        assert time.monotonic() - t0 < 2.0
        assert dst.status == "cancelled"


def test_destination_cancel_while_parked_at_a_sync():
    """Channel 0 reached its SYNC, channel 1 never does: the receivers park; cancel ends it at once."""
    sid = os.urandom(16)
    # a long timeout: the idle watchdog must not end the parked session before the cancel does
    with GuestRAM.create({"a": 64 * 4096}) as d, Destination(d, config=cfg(timeout=60.0)) as dst:
        socks = []

        def admit(hello):
            s = socket.create_connection(dst.address, timeout=5)
            auth.decode_greeting(s.recv(auth.GREETING_SIZE, socket.MSG_WAITALL))
            s.sendall(encode_hello(hello))
            auth.decode_welcome(s.recv(auth.WELCOME_SIZE, socket.MSG_WAITALL))
            socks.append(s)
            return s

        try:
            ctrl = admit(Hello(KIND_CONTROL, sid, CONTROL_CHANNEL, 2))
            ctrl.sendall(
                encode_control(Config(sid, 4096, 2, 128, (BlockSpec("a", 64 * 4096),), "none", {}, "multifd", False))
            )
            # as a source does: data channels only once the destination took the configuration
            # (earlier ones are dropped as "before the session was configured")
            acks = ControlDecoder()
            while (msg := acks.next_message()) is None:
                acks.feed(ctrl.recv(4096))
            assert isinstance(msg, ConfigAck), msg
            d0 = admit(Hello(KIND_DATA, sid, 0, 2))
            admit(Hello(KIND_DATA, sid, 1, 2))
            d0.sendall(bytes(DataHeaderEncoder(128).encode(flags=FLAG_SYNC, round=0, packet_num=1)))
            wait_for(lambda: any(r.at_sync == 0 for r in dst._receivers.values()), 30, what="a parked receiver")
            t0 = time.monotonic()
            dst.cancel()
            with pytest.raises(MigrationCancelled):
                dst.wait(5)
            assert time.monotonic() - t0 < 3.0
        finally:
            for s in socks:
                s.close()


def test_ctrl_c_in_the_cli_cancels_cleanly():
    env = dict(os.environ)
    env["PYTHONPATH"] = (
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.pathsep + env.get("PYTHONPATH", "")
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "mpmultifd", "demo", "--size", "1G", "--content", "random", "--channels", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = ""
        while "migrating" not in line:
            line = proc.stdout.readline()
            assert line, "demo ended before migrating"
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, (out, err)
    assert "cancelled" in err
    assert "Traceback" not in err
