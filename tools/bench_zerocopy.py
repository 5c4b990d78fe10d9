#!/usr/bin/env python3
"""Plain ``sendmsg`` vs MSG_ZEROCOPY vs TLS, side by side, on the same bytes.

Each packet is what a channel worker sends with no compression: one data
header (the real :class:`~mpmultifd.wire.DataHeaderEncoder`) plus 128 page
IOVs, memoryview slices of a 256 MiB numpy region taken in a random page
order (so nothing coalesces): 512 KiB of pages per ``sendmsg``. ``--size``
bytes of pages (1 GiB by default) go over one TCP connection to a receiver
process that ``recv_into``-s a 4 MiB scratch buffer until EOF.

Configurations:

- ``lo plain`` / ``lo zc``: loopback, ``transport.sendmsg_all`` vs
  :class:`~mpmultifd.zerocopy.ZeroCopySender` (fallback disabled, so every send
  really is MSG_ZEROCOPY; the sender flushes before the clock stops).
- ``veth plain`` / ``veth zc``: sender in one network namespace, receiver in
  another, joined by a veth pair on 198.18.0.0/30. The tool creates both
  namespaces and deletes them at the end, whatever happens.
- ``veth+xdp plain`` / ``veth+xdp zc`` (``--xdp``): the same with an XDP_PASS
  program attached natively to the receiving veth; completions then come back
  not COPIED (see tests/test_zerocopy.py), at the price of veth without GSO.
- ``lo tls``: TLS 1.3 over loopback with a self-signed certificate made for the
  run (``cryptography`` if installed, else the ``openssl`` CLI);
  ``SSLSocket.sendall`` of each IOV, none joined.

Runs are interleaved (every configuration once, then again) and the table
shows the median of ``--runs`` runs in GiB/s of page payload, the sender's CPU
seconds per GiB (its thread's user+sys), and for zero-copy the completion
counts. Needs root for the veth rows (skipped otherwise).

Example::

    python tools/bench_zerocopy.py --size 1G --runs 3
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import multiprocessing
import os
import platform
import shutil
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mpmultifd.cli import parse_size  # noqa: E402
from mpmultifd.transport import sendmsg_all  # noqa: E402
from mpmultifd.wire import DataHeaderEncoder  # noqa: E402
from mpmultifd.zerocopy import ZeroCopySender  # noqa: E402

PAGE = 4096
PACKET_PAGES = 128
REGION = 256 << 20
SCRATCH = 4 << 20
_libc = ctypes.CDLL(None, use_errno=True)


# --------------------------------------------------------------------------- namespaces


def in_netns(path: str | None, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a short-lived thread that first joins the network namespace at ``path``.

    Sockets keep the namespace they were made in, so only their creation
    needs this; the calling thread never changes namespace.
    """
    if path is None:
        return fn()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                if _libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                    e = ctypes.get_errno()
                    raise OSError(e, f"setns({path}): {os.strerror(e)}")
            finally:
                os.close(fd)
            box["v"] = fn()
        except BaseException as e:
            box["e"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]
    return box["v"]


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


def _ip_ok(*args: str) -> None:
    r = _ip(*args)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


@dataclass
class VethPair:
    ns_a: str
    ns_b: str
    dev_a: str
    dev_b: str
    addr_b: str = "198.18.0.2"

    @property
    def path_a(self) -> str:
        return f"/run/netns/{self.ns_a}"

    @property
    def path_b(self) -> str:
        return f"/run/netns/{self.ns_b}"


@contextlib.contextmanager
def veth_pair() -> Iterator[VethPair | str]:
    """Two fresh namespaces joined by veth; yields a reason string when that is impossible."""
    if os.geteuid() != 0:
        yield "needs root"
        return
    if shutil.which("ip") is None:
        yield "iproute2 ('ip') not installed"
        return
    tag = f"{os.getpid()}x{os.urandom(2).hex()}"
    made: list[str] = []
    try:
        for side in "ab":
            name = f"mpzcbench{tag}{side}"
            r = _ip("netns", "add", name)
            if r.returncode != 0:
                yield f"ip netns add: {r.stderr.strip()}"
                return
            made.append(name)
        a, b = made
        suffix = os.urandom(4).hex()
        va, vb = f"zb{suffix}a", f"zb{suffix}b"
        r = _ip("link", "add", va, "netns", a, "type", "veth", "peer", "name", vb, "netns", b)
        if r.returncode != 0:
            yield f"veth: {r.stderr.strip()}"
            return
        for ns, dev, addr in ((a, va, "198.18.0.1/30"), (b, vb, "198.18.0.2/30")):
            _ip_ok("-n", ns, "addr", "add", addr, "dev", dev)
            _ip_ok("-n", ns, "link", "set", dev, "up")
            _ip_ok("-n", ns, "link", "set", "lo", "up")
        yield VethPair(a, b, va, vb)
    finally:
        for name in made:  # deleting a namespace deletes its end of the veth, and so the pair
            _ip("netns", "del", name)


def attach_xdp_pass(ifname: str) -> None:
    """Load ``r0 = XDP_PASS; exit`` with bpf(2) and attach it in native mode (rtnetlink)."""
    nr = {"x86_64": 321, "aarch64": 280}.get(platform.machine())
    if nr is None:
        raise OSError(0, f"bpf syscall number unknown for {platform.machine()}")
    insns = ctypes.create_string_buffer(struct.pack("<BBhiBBhi", 0xB7, 0, 0, 2, 0x95, 0, 0, 0), 16)
    lic = ctypes.create_string_buffer(b"GPL")
    attr = ctypes.create_string_buffer(
        struct.pack(
            "<IIQQIIQII16sII", 6, 2, ctypes.addressof(insns), ctypes.addressof(lic), 0, 0, 0, 0, 0, b"zcpass", 0, 0
        ),
        128,
    )
    fd = _libc.syscall(nr, 5, attr, 128)  # BPF_PROG_LOAD, BPF_PROG_TYPE_XDP
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"BPF_PROG_LOAD: {os.strerror(e)}")
    try:

        def nla(kind: int, payload: bytes) -> bytes:
            n = 4 + len(payload)
            return struct.pack("<HH", n, kind) + payload + bytes(-n % 4)

        xdp = nla(1, struct.pack("<i", fd)) + nla(3, struct.pack("<I", 4))  # IFLA_XDP_FD, FLAGS=DRV_MODE
        body = struct.pack("<BBHiII", 0, 0, 0, socket.if_nametoindex(ifname), 0, 0) + nla(43 | 0x8000, xdp)
        msg = struct.pack("<IHHII", 16 + len(body), 19, 1 | 4, 1, 0) + body  # RTM_SETLINK, REQUEST|ACK
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as nl:
            nl.settimeout(10)
            nl.bind((0, 0))
            nl.send(msg)
            resp = nl.recv(65536)
        if struct.unpack_from("<H", resp, 4)[0] == 2:  # NLMSG_ERROR
            err = -struct.unpack_from("<i", resp, 16)[0]
            if err:
                raise OSError(err, f"attach XDP to {ifname}: {os.strerror(err)}")
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- TLS


def make_tls_contexts(tmp: str) -> tuple[ssl.SSLContext, ssl.SSLContext, str]:
    """Server and client contexts around a self-signed certificate for ``localhost``."""
    cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
    try:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        pkey = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
        now = datetime.datetime.now(datetime.timezone.utc)
        crt = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(pkey.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(pkey, hashes.SHA256())
        )
        with open(cert, "wb") as f:
            f.write(crt.public_bytes(serialization.Encoding.PEM))
        with open(key, "wb") as f:
            f.write(
                pkey.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
        how = "cryptography"
    except ImportError:
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=localhost",
                "-addext", "subjectAltName=DNS:localhost",
            ],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        how = "openssl CLI"
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cert)
    return server, client, how


# --------------------------------------------------------------------------- receiver (child process)


def receiver_main(netns: str | None, host: str, tls: ssl.SSLContext | None, conn: Any) -> None:
    """Accept one connection, read to EOF into a scratch buffer, report the byte count."""
    try:
        def mk() -> socket.socket:
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            s.bind((host, 0))
            s.listen(1)
            return s

        lst = in_netns(netns, mk)
        lst.settimeout(60)
        conn.send(("port", lst.getsockname()[1]))
        sock, _ = lst.accept()
        lst.close()
        sock.settimeout(120)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_side=True)
        scratch = memoryview(bytearray(SCRATCH))
        got = 0
        while True:
            n = sock.recv_into(scratch)
            if n == 0:
                break
            got += n
        sock.close()
        conn.send(("done", got))
    except BaseException as e:  # reported, not raised: the parent prints it
        conn.send(("error", repr(e)))


# --------------------------------------------------------------------------- sender


@dataclass
class Config:
    name: str
    host: str = "127.0.0.1"
    send_ns: str | None = None
    recv_ns: str | None = None
    mode: str = "plain"  # plain | zc | tls


@dataclass
class Run:
    gib_s: float
    cpu_s_per_gib: float
    stats: dict[str, int] = field(default_factory=dict)


def run_once(cfg: Config, data: memoryview, plan: np.ndarray, tls: tuple | None) -> Run:
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    server_ctx = tls[0] if (cfg.mode == "tls" and tls) else None
    proc = ctx.Process(target=receiver_main, args=(cfg.recv_ns, cfg.host, server_ctx, child), daemon=True)
    proc.start()
    child.close()
    sock: socket.socket | None = None
    try:
        if not parent.poll(30):
            raise RuntimeError("receiver did not start")
        kind, port = parent.recv()
        if kind != "port":
            raise RuntimeError(f"receiver: {port}")

        def mk() -> socket.socket:
            s = socket.create_connection((cfg.host, port), timeout=30)
            s.settimeout(None)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return s

        sock = in_netns(cfg.send_ns, mk)
        if cfg.mode == "tls":
            sock = tls[1].wrap_socket(sock, server_hostname="localhost")
        enc = DataHeaderEncoder(PACKET_PAGES)
        payload_len = PACKET_PAGES * PAGE
        zs = ZeroCopySender(sock, fallback_ratio=2.0) if cfg.mode == "zc" else None
        wire = 0
        c0 = time.thread_time()
        t0 = time.perf_counter()
        for i, offs in enumerate(plan):
            header = enc.encode(
                block=0, round=0, packet_num=i, normal_offsets=offs, payload_len=payload_len
            )
            iovs = [data[o : o + PAGE] for o in offs.tolist()]
            if zs is not None:
                header = bytearray(header)  # the encoder's buffer is reused: each send needs its own
                zs.send([header, *iovs], header, nbytes=len(header) + payload_len)
            elif cfg.mode == "tls":
                sock.sendall(header)
                for v in iovs:
                    sock.sendall(v)
            else:
                sendmsg_all(sock, [header, *iovs])
            wire += enc.size + payload_len
        if zs is not None:
            zs.flush(60)
        sock.shutdown(socket.SHUT_WR)  # with TLS too: the receiver takes the bare EOF as the end
        if not parent.poll(120):
            raise RuntimeError("receiver did not finish")
        kind, got = parent.recv()
        elapsed = time.perf_counter() - t0
        cpu = time.thread_time() - c0
        if kind != "done":
            raise RuntimeError(f"receiver: {got}")
        if got != wire:
            raise RuntimeError(f"receiver got {got} bytes, {wire} were sent")
        gib = len(plan) * payload_len / 2**30
        return Run(gib / elapsed, cpu / gib, dict(zs.stats) if zs is not None else {})
    finally:
        if sock is not None:
            sock.close()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        parent.close()


def make_plan(size: int, seed: int = 7) -> np.ndarray:
    """Byte offsets, one row of 128 per packet: passes over a random permutation of the region's pages."""
    rng = np.random.default_rng(seed)
    npackets = max(1, size // (PACKET_PAGES * PAGE))
    npages = REGION // PAGE
    passes = -(-npackets * PACKET_PAGES // npages)
    order = np.concatenate([rng.permutation(npages) for _ in range(passes)])[: npackets * PACKET_PAGES]
    return (order * PAGE).astype(np.int64).reshape(npackets, PACKET_PAGES)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="page bytes per run (default 1G)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-veth", action="store_true", help="skip the namespace rows")
    ap.add_argument("--no-tls", action="store_true")
    ap.add_argument("--xdp", action=argparse.BooleanOptionalAction, default=True,
                    help="also run veth with an XDP_PASS program on the receiving end")  # fmt: skip
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    plan = make_plan(size)
    region = np.random.default_rng(1).integers(0, 256, size=REGION, dtype=np.uint8)
    data = memoryview(region).cast("B")
    print(
        f"{len(plan)} packets x {PACKET_PAGES} pages ({len(plan) * PACKET_PAGES * PAGE / 2**30:.2f} GiB of pages), "
        f"{args.runs} runs, python {platform.python_version()}, kernel {platform.release()}, "
        f"{os.cpu_count()} CPUs",
        flush=True,
    )
    notes: list[str] = []
    veth: VethPair | str | None = None
    with contextlib.ExitStack() as stack:
        configs = [Config("lo plain"), Config("lo zc", mode="zc")]
        if not args.no_veth:
            veth = stack.enter_context(veth_pair())
            if isinstance(veth, str):
                notes.append(f"veth rows skipped: {veth}")
            else:
                v = dict(host=veth.addr_b, send_ns=veth.path_a, recv_ns=veth.path_b)
                configs += [Config("veth plain", **v), Config("veth zc", mode="zc", **v)]
        tls = None
        if not args.no_tls:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="mpzc-tls-"))
            try:
                *tls, how = make_tls_contexts(tmp)
                configs.append(Config("lo tls", host="127.0.0.1", mode="tls"))
                notes.append(f"TLS certificate made with the {how}; {ssl.OPENSSL_VERSION}")
            except (OSError, subprocess.SubprocessError) as e:
                notes.append(f"TLS row skipped: {e}")
        results: dict[str, list[Run]] = {c.name: [] for c in configs}
        xdp_configs: list[Config] = []
        for r in range(args.runs):
            for c in configs:
                results[c.name].append(run_once(c, data, plan, tls))
                print(f"  run {r + 1} {c.name:>15}: {results[c.name][-1].gib_s:.2f} GiB/s", flush=True)
        if args.xdp and isinstance(veth, VethPair):
            # after the plain veth rows: the program stays attached until the namespace goes
            try:
                in_netns(veth.path_b, lambda: attach_xdp_pass(veth.dev_b))
                v = dict(host=veth.addr_b, send_ns=veth.path_a, recv_ns=veth.path_b)
                xdp_configs = [Config("veth+xdp plain", **v), Config("veth+xdp zc", mode="zc", **v)]
                for c in xdp_configs:
                    results[c.name] = []
                for r in range(args.runs):
                    for c in xdp_configs:
                        results[c.name].append(run_once(c, data, plan, tls))
                        print(f"  run {r + 1} {c.name:>15}: {results[c.name][-1].gib_s:.2f} GiB/s", flush=True)
            except OSError as e:
                notes.append(f"XDP rows skipped: {e}")
    print()
    print("| configuration   | GiB/s median | runs (GiB/s)     | vs plain | sender CPU-s/GiB | zero-copy (run 1) |")
    print("|-----------------|-------------:|------------------|---------:|-----------------:|-------------------|")
    for name, runs in results.items():
        med = statistics.median(x.gib_s for x in runs)
        plain = results.get(name.rsplit(" ", 1)[0] + " plain", results["lo plain"])
        ratio = med / statistics.median(x.gib_s for x in plain)
        cpu = statistics.median(x.cpu_s_per_gib for x in runs)
        spread = " ".join(f"{x.gib_s:.2f}" for x in runs)
        zc = ""
        if runs[0].stats:
            st = runs[0].stats
            zc = (
                f"{st['sends']} ids, {st['completions']} completed, {st['copied']} COPIED, "
                f"{st['notifications']} notifications, {st['enobufs']} ENOBUFS"
            )
        print(f"| {name:<15} | {med:12.2f} | {spread:<16} | {ratio:7.2f}x | {cpu:16.2f} | {zc} |")
    print()
    for n in notes:
        print("note:", n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
