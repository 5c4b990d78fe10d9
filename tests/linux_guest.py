"""A real Linux guest that checks its own memory, built at test time from Debian packages.

The guest is the Debian cloud kernel (``/boot/vmlinuz-*-cloud-amd64``, package
``linux-image-cloud-amd64``: 8250 serial console, devtmpfs, tmpfs and gzip
initrd built in) and an initramfs made here from ``busybox-static`` with
``cpio`` and gzip (:func:`build_initramfs`, cached per parameters in a
directory of the test session). Its ``init``:

1. mounts proc, sysfs, devtmpfs and a tmpfs on ``/t``;
2. writes ``data`` MiB of random bytes to ``/t/data`` once and remembers its md5;
3. optionally fills ``fill`` percent of the memory left with ``/t/fill*``
   files (random MiB repeated), so most of the guest's RAM holds data;
4. prints ``READY <md5>`` and then loops forever: rewrite ``/t/load`` (1 MiB of
   random bytes: the load that dirties pages), recompute the md5 of
   ``/t/data`` and print ``CHECK <n> OK`` or ``CHECK <n> BAD`` on the serial
   console, sleep 0.2 s.

Memory lost or corrupted by a migration shows as a ``BAD`` line, a panic, or
silence. The parameters travel on the kernel command line (``mpmdata=``,
``mpmfill=``; the kernel hands unknown ``name=value`` words to init's
environment), so one initramfs serves every guest.

QEMU runs under TCG (this kernel hangs early in boot under the nested KVM of
the machine this was written on), with its RAM a ``memory-backend-file,share=on``
in ``/dev/shm`` named with the per-test-worker ``MPMULTIFD_SHM_PREFIX`` (the
leak checks of ``tests/conftest.py`` see a file left behind), the serial
console in a file, and two QMP sockets: ``qmp_path`` for the test and
``agent_qmp_path`` for mpmultifd's handover (a QMP socket serves one client at
a time). QEMU is started directly (its real pid, no wrapper shell) and
:meth:`LinuxGuest.close` always kills it, reaps it, and deletes the backend
file.
"""

from __future__ import annotations

import atexit
import glob
import os
import re
import shutil
import subprocess
import tempfile
import time

from mpmultifd._shm import SHM_DIR, unique_name
from mpmultifd.qemu import QMP, QMPError

__all__ = [
    "QEMU_BINARY",
    "GuestError",
    "LinuxGuest",
    "build_initramfs",
    "kernel_image",
    "missing",
]

QEMU_BINARY = "qemu-system-x86_64"
BUSYBOX = "/bin/busybox"
BACKEND_ID = "ram0"

GuestError = QMPError

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o size=95% t /t
data=${mpmdata:-4}
fill=${mpmfill:-0}
dd if=/dev/urandom of=/t/data bs=1048576 count=$data 2>/dev/null
sum=$(md5sum /t/data | cut -d' ' -f1)
if [ "$fill" -gt 0 ]; then
  dd if=/dev/urandom of=/t/chunk bs=1048576 count=1 2>/dev/null
  avail=$(awk '/MemAvailable/ {print int($2 / 1024)}' /proc/meminfo)
  want=$((avail * fill / 100))
  i=0
  while [ $i -lt $want ]; do
    cat /t/chunk /t/chunk /t/chunk /t/chunk /t/chunk /t/chunk /t/chunk /t/chunk > /t/fill$i
    i=$((i + 8))
  done
  echo "FILLED $i MiB"
fi
echo "READY $sum"
n=0
while true; do
  dd if=/dev/urandom of=/t/load bs=65536 count=16 2>/dev/null
  now=$(md5sum /t/data | cut -d' ' -f1)
  if [ "$now" = "$sum" ]; then echo "CHECK $n OK"; else echo "CHECK $n BAD $now"; fi
  n=$((n + 1))
  sleep 0.2
done
"""

_CHECK = re.compile(r"^CHECK (\d+) (OK|BAD)", re.M)


def qemu_binary() -> str | None:
    return shutil.which(QEMU_BINARY)


def kernel_image() -> str | None:
    """The newest ``/boot/vmlinuz-*-cloud-amd64`` readable here, or None."""
    found = sorted(p for p in glob.glob("/boot/vmlinuz-*-cloud-amd64") if os.access(p, os.R_OK))
    return found[-1] if found else None


def missing() -> str | None:
    """Why the Linux guest cannot run here (with the Debian package to install), or None."""
    need = []
    if qemu_binary() is None:
        need.append(f"{QEMU_BINARY} (qemu-system-x86)")
    if kernel_image() is None:
        need.append("/boot/vmlinuz-*-cloud-amd64 (linux-image-cloud-amd64)")
    if not _static_busybox():
        need.append(f"a static {BUSYBOX} (busybox-static)")
    if shutil.which("cpio") is None:
        need.append("cpio (cpio)")
    if shutil.which("gzip") is None:
        need.append("gzip (gzip)")
    if not need:
        return None
    return "the Linux test guest needs " + ", ".join(need) + ": apt-get install qemu-system-x86 " \
           "linux-image-cloud-amd64 busybox-static cpio (.ci/run does this as root)"


def _static_busybox() -> bool:
    try:
        with open(BUSYBOX, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    # a dynamic ELF names its interpreter (/lib64/ld-linux...) in a PT_INTERP near the start
    return head.startswith(b"\x7fELF") and b"ld-linux" not in head


_cache: dict[str, str] = {}


def build_initramfs(workdir: str | None = None) -> str:
    """Build (once per process) the gzip'd cpio initramfs; returns its path."""
    if "initrd" in _cache and os.path.exists(_cache["initrd"]):
        return _cache["initrd"]
    if workdir is None:
        base = tempfile.mkdtemp(prefix="mpm-linux-guest-")
        atexit.register(shutil.rmtree, base, True)  # the cache lives as long as this process
    else:
        base = workdir
    root = os.path.join(base, "root")
    for d in ("bin", "proc", "sys", "dev", "t"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    shutil.copy2(BUSYBOX, os.path.join(root, "bin", "busybox"))
    init = os.path.join(root, "init")
    with open(init, "w") as f:
        f.write(INIT)
    os.chmod(init, 0o755)
    out = os.path.join(base, "initrd.gz")
    files = subprocess.run(["find", "."], cwd=root, check=True, capture_output=True).stdout
    cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files, check=True,
                          capture_output=True).stdout
    gz = subprocess.run(["gzip", "-1"], input=cpio, check=True, capture_output=True).stdout
    with open(out, "wb") as f:
        f.write(gz)
    _cache["initrd"] = out
    return out


class LinuxGuest:
    """One QEMU running the self-checking Linux guest; RAM in a shared ``/dev/shm`` file.

    ``workdir`` (e.g. pytest's ``tmp_path``) gets the serial log and QMP
    sockets. ``mem`` in MiB; ``data`` MiB checked by the guest; ``fill``
    percent of its free memory filled with data; ``incoming=True`` starts QEMU
    with ``-incoming defer`` (a handover destination: same machine, its own
    backend file). Use as a context manager, or :meth:`start` and, in a
    ``finally``, :meth:`close`.
    """

    def __init__(self, workdir: str | os.PathLike[str], *, mem: int = 256, data: int = 4, fill: int = 0,
                 incoming: bool = False, name: str = "guest", initrd: str | None = None,
                 mem_path: str | None = None) -> None:
        self.workdir = os.fspath(workdir)
        self.mem, self.data, self.fill, self.incoming = mem, data, fill, incoming
        self.binary = qemu_binary() or QEMU_BINARY
        self.kernel = kernel_image() or "/boot/vmlinuz-cloud-amd64"
        self.initrd = initrd
        # a destination of its own backend file; ``mem_path`` shares another guest's (a local handover)
        self.mem_path = mem_path or os.path.join(SHM_DIR, unique_name("vm"))
        self._own_file = mem_path is None
        self._sockdir = tempfile.mkdtemp(prefix="mpmvm-")  # short: a Unix socket path must fit in 108 bytes
        self.qmp_path = os.path.join(self._sockdir, f"{name}.qmp")
        self.agent_qmp_path = os.path.join(self._sockdir, f"{name}-agent.qmp")
        self.serial = os.path.join(self.workdir, f"{name}.serial")
        self.log = os.path.join(self.workdir, f"{name}.log")
        self.proc: subprocess.Popen | None = None
        self.qmp: QMP | None = None

    def argv(self) -> list[str]:
        argv = [
            self.binary,
            "-machine", f"pc,accel=tcg,memory-backend={BACKEND_ID}",
            "-m", f"{self.mem}M",
            "-object", f"memory-backend-file,id={BACKEND_ID},size={self.mem}M,mem-path={self.mem_path},share=on",
            "-smp", "1",
            "-kernel", self.kernel,
            "-initrd", self.initrd or build_initramfs(),
            "-append", f"console=ttyS0 quiet panic=-1 mpmdata={self.data} mpmfill={self.fill}",
            "-display", "none", "-nodefaults", "-no-user-config", "-no-reboot",
            "-serial", f"file:{self.serial}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-qmp", f"unix:{self.agent_qmp_path},server=on,wait=off",
        ]
        if self.incoming:
            argv += ["-incoming", "defer", "-S"]
        return argv

    def start(self, timeout: float = 30.0) -> LinuxGuest:
        """Start QEMU (the guest boots meanwhile, or waits for its state with ``incoming``) and connect QMP."""
        argv = self.argv()
        with open(self.log, "wb") as logf:
            # a session of its own: a Ctrl-C on the test run reaches our finally, not QEMU first
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            self.qmp = QMP(self.qmp_path, self.proc, self.log, timeout)
            # the agent's socket exists once QEMU listens on it (both open before the machine starts)
            deadline = time.monotonic() + timeout
            while not os.path.exists(self.agent_qmp_path):
                if time.monotonic() > deadline:
                    raise GuestError(f"QEMU did not open {self.agent_qmp_path}")
                time.sleep(0.01)
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self) -> LinuxGuest:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- QMP

    def cmd(self, name: str, args: dict | None = None, timeout: float = 30.0):
        if self.qmp is None:
            raise GuestError("QEMU is not running")
        return self.qmp.cmd(name, args, timeout)

    def status(self) -> str:
        """QEMU's run state: ``running``, ``paused``, ``inmigrate``, ``postmigrate``, ..."""
        return self.cmd("query-status")["status"]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ---- the console

    def console(self) -> str:
        try:
            with open(self.serial, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def checks(self) -> list[tuple[int, bool]]:
        """Every ``CHECK n OK|BAD`` line printed so far, as ``(n, ok)``."""
        return [(int(n), ok == "OK") for n, ok in _CHECK.findall(self.console())]

    def wait_checks(self, count: int = 1, *, after: int = -1, timeout: float = 60.0) -> list[tuple[int, bool]]:
        """Wait until ``count`` CHECK lines numbered above ``after`` appeared; returns all CHECK lines.

        Raises GuestError, quoting the console, on a BAD line, on timeout, or when QEMU exits.
        """
        deadline = time.monotonic() + timeout
        while True:
            checks = self.checks()
            bad = [n for n, ok in checks if not ok]
            if bad:
                raise GuestError(f"the guest reported its memory BAD at check {bad[0]}:\n{self._tail()}")
            if sum(1 for n, _ in checks if n > after) >= count:
                return checks
            if not self.alive():
                code = None if self.proc is None else self.proc.returncode
                raise GuestError(f"QEMU exited ({code}) while waiting for checks:\n{self._tail()}\n"
                                 f"QEMU log:\n{self._log()}")
            if time.monotonic() > deadline:
                raise GuestError(f"{count} checks after {after} did not come in {timeout:g} s:\n{self._tail()}")
            time.sleep(0.05)

    def last_check(self) -> int:
        checks = self.checks()
        return checks[-1][0] if checks else -1

    def _tail(self, n: int = 15) -> str:
        return "\n".join(self.console().splitlines()[-n:])

    def _log(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    # ---- the end

    def kill(self) -> None:
        """Kill QEMU now (this pid only: we started it) and reap it."""
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(30)

    def close(self) -> None:
        """Kill and reap QEMU, delete the backend file and the sockets; idempotent."""
        try:
            self.kill()
        finally:
            if self._own_file:
                try:
                    os.unlink(self.mem_path)
                except FileNotFoundError:
                    pass
            shutil.rmtree(self._sockdir, ignore_errors=True)
