#!/usr/bin/env python3
"""Escape attempts run by a confined agent in the end-to-end tests.

Each probe prints one JSON line {"probe": ..., "ok": bool, "detail": ...}; "ok" means the
network action succeeded (for an escape attempt, that is a failure of the enforcer).
Probes never raise: every exception becomes ok=false with its errno name.
"""
import errno
import json
import os
import socket
import struct
import sys
import time

TIMEOUT = 2.0


def report(probe, ok, detail=""):
    print(json.dumps({"probe": probe, "ok": ok, "detail": str(detail)}), flush=True)


def err_name(exc):
    code = getattr(exc, "errno", None)
    if code is not None and code in errno.errorcode:
        return errno.errorcode[code]
    return type(exc).__name__


def http_get(host, port, family=socket.AF_INET):
    """A TCP connect and one HTTP request; ok when an HTTP status line comes back."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT)
        s.connect((host, port))
        s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        data = s.recv(64)
        return data.startswith(b"HTTP/")


def probe_tcp(name, host, port, family):
    try:
        report(name, http_get(host, int(port), family))
    except Exception as exc:  # noqa: BLE001 - every failure is a result
        report(name, False, err_name(exc))


def probe_udp_sendto(name, host, port, family):
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.sendto(b"escape", (host, int(port)))
        report(name, True)
    except Exception as exc:  # noqa: BLE001
        report(name, False, err_name(exc))


def probe_udp_flood(name, count, host, port):
    """count sendto calls in a tight loop; ok if any went out, detail: how many failed."""
    failed = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _ in range(int(count)):
            try:
                s.sendto(b"x", (host, int(port)))
            except OSError:
                failed += 1
    report(name, failed < int(count), failed)


def probe_udp_connect(name, host, port):
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, int(port)))
            s.send(b"escape")
        report(name, True)
    except Exception as exc:  # noqa: BLE001
        report(name, False, err_name(exc))


def probe_dns(name, host, port):
    """A real DNS query (A example.test) to a resolver; ok when an answer arrives."""
    query = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    for label in (b"example", b"test"):
        query += bytes([len(label)]) + label
    query += b"\x00" + struct.pack(">HH", 1, 1)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(TIMEOUT)
            s.sendto(query, (host, int(port)))
            data, _ = s.recvfrom(512)
            report(name, data[:2] == b"\x12\x34")
    except Exception as exc:  # noqa: BLE001
        report(name, False, err_name(exc))


def icmp_echo(seq):
    header = struct.pack(">BBHHH", 8, 0, 0, 0x4242, seq)
    payload = b"enforcer"
    total = header + payload
    csum = 0
    for i in range(0, len(total), 2):
        csum += (total[i] << 8) + total[i + 1]
    csum = (csum >> 16) + (csum & 0xFFFF)
    csum = ~(csum + (csum >> 16)) & 0xFFFF
    return struct.pack(">BBHHH", 8, 0, csum, 0x4242, seq) + payload


def probe_raw_icmp(name, host):
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
            s.sendto(icmp_echo(1), (host, 0))
        report(name, True)
    except Exception as exc:  # noqa: BLE001
        report(name, False, err_name(exc))


def probe_ping_socket(name, host):
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP) as s:
            s.settimeout(TIMEOUT)
            s.sendto(icmp_echo(2), (host, 0))
            s.recv(64)
        report(name, True)
    except Exception as exc:  # noqa: BLE001
        report(name, False, err_name(exc))


def probe_packet(name):
    try:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)) as s:
            s.bind(("lo", 0))
            s.send(b"\x00" * 60)
        report(name, True)
    except Exception as exc:  # noqa: BLE001
        report(name, False, err_name(exc))


def probe_vsock(name):
    """A socket of a family no cgroup hook sees: AF_VSOCK reaches the hypervisor host."""
    try:
        with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM):
            pass
        report(name, True)
    except Exception as exc:  # noqa: BLE001
        report(name, False, err_name(exc))


def probe_sock_packet(name):
    """AF_INET with the legacy type SOCK_PACKET: the kernel makes it a packet socket."""
    try:
        with socket.socket(socket.AF_INET, 10, socket.htons(3)):
            pass
        report(name, True)
    except Exception as exc:  # noqa: BLE001
        report(name, False, err_name(exc))


def probe_userns(name):
    """unshare(CLONE_NEWUSER | CLONE_NEWNET) in a child: all capabilities in new namespaces."""
    pid = os.fork()
    if pid == 0:
        rc, err = libc_call(272 if os.uname().machine == "x86_64" else 97, 0x10000000 | 0x40000000)
        os._exit(0 if rc == 0 else min(err, 255))
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    report(name, code == 0, errno.errorcode.get(code, code) if code else "")


def with_sleeping_child(action):
    """Runs action(pid) against a child of this process, which is then killed."""
    pid = os.fork()
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    try:
        return action(pid)
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


def libc_call(nr, *args):
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    rc = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    return rc, ctypes.get_errno()


def probe_ptrace(name):
    """PTRACE_ATTACH to a child of its own uid: how one process takes over another."""
    def attach(pid):
        rc, err = libc_call(101, 16, pid, 0, 0)  # ptrace(PTRACE_ATTACH)
        if rc == 0:
            libc_call(101, 17, pid, 0, 0)  # PTRACE_DETACH
            return True, ""
        return False, errno.errorcode.get(err, err)
    ok, detail = with_sleeping_child(attach)
    report(name, ok, detail)


def probe_pidfd_getfd(name):
    """Copies another process's descriptor (its stdin) with pidfd_getfd."""
    def steal(pid):
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as exc:
            return False, err_name(exc)
        rc, err = libc_call(438, pidfd, 0, 0)
        os.close(pidfd)
        if rc >= 0:
            os.close(rc)
            return True, ""
        return False, errno.errorcode.get(err, err)
    ok, detail = with_sleeping_child(steal)
    report(name, ok, detail)


def probe_io_uring(name):
    """io_uring_setup: ring operations (sockets among them) never pass through seccomp."""
    import ctypes

    params = ctypes.create_string_buffer(120)
    rc, err = libc_call(425, 8, ctypes.addressof(params))
    if rc >= 0:
        os.close(rc)
        report(name, True)
    else:
        report(name, False, errno.errorcode.get(err, err))


def probe_fd(name, fd):
    """ok when descriptor fd is open: something the caller left open reached the agent."""
    try:
        os.fstat(int(fd))
        report(name, True)
    except OSError as exc:
        report(name, False, err_name(exc))


def probe_env(name, key):
    report(name, key in os.environ, os.environ.get(key, ""))


def probe_identity(name):
    """ok when this process leads a session of its own (so no controlling terminal to
    push input into); detail is its uid and gid."""
    report(name, os.getsid(0) == os.getpid(), f"{os.getuid()} {os.getgid()}")


def probe_cgroup_escape(name, procs_path):
    try:
        with open(procs_path, "w") as f:
            f.write(str(os.getpid()))
        report(name, True)
    except Exception as exc:  # noqa: BLE001
        report(name, False, err_name(exc))


def probe_http(name, method, url, body):
    """An HTTP request the way agents make them: urllib, honouring HTTP(S)_PROXY and
    SSL_CERT_FILE from the environment. ok when the status is 2xx; detail is the status."""
    import ssl
    import urllib.error
    import urllib.request

    data = body.encode() if body else None
    req = urllib.request.Request(url, data=data, method=method)
    if data:
        req.add_header("Content-Type", "application/json")
    ctx = ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE"))
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT * 2, context=ctx) as resp:
            report(name, 200 <= resp.status < 300, resp.status)
    except urllib.error.HTTPError as exc:
        report(name, False, exc.code)
    except Exception as exc:  # noqa: BLE001
        reason = getattr(exc, "reason", exc)
        report(name, False, err_name(reason) if isinstance(reason, OSError) else type(reason).__name__)


def probe_read(name, path):
    try:
        with open(path, "rb") as f:
            f.read(16)
        report(name, True)
    except Exception as exc:  # noqa: BLE001
        report(name, False, err_name(exc))


def probe_unix(name, path):
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(TIMEOUT)
            s.connect(path)
            s.sendall(b'{"version":1,"op":"reset","agent":"x"}\n')
            answer = s.recv(256)
            report(name, b'"ok":true' in answer, answer.decode(errors="replace")[:80])
    except Exception as exc:  # noqa: BLE001
        report(name, False, err_name(exc))


def probe_bind(name, host, port, family):
    """Binds a TCP socket to host:port and listens; ok when both succeed."""
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, int(port)))
            s.listen(1)
        report(name, True)
    except Exception as exc:  # noqa: BLE001
        report(name, False, err_name(exc))


def probe_abstract(name, socket_name):
    """Connects to the abstract Unix socket socket_name; ok when the connect succeeds."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(TIMEOUT)
            s.connect("\0" + socket_name)
        report(name, True)
    except Exception as exc:  # noqa: BLE001
        report(name, False, err_name(exc))


def probe_abstract_self(name):
    """Listens on an abstract Unix socket of its own and connects to it."""
    try:
        socket_name = "\0probe-self-%d" % os.getpid()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(socket_name)
            server.listen(1)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(TIMEOUT)
                s.connect(socket_name)
        report(name, True)
    except Exception as exc:  # noqa: BLE001
        report(name, False, err_name(exc))


def hold(host, port):
    """Opens a connection to the gateway's echo service, proves it works, then waits for
    'go' on stdin and tries the same connection again and a new one."""
    s = socket.create_connection((host, int(port)), timeout=TIMEOUT)
    s.sendall(b"one\n")
    report("held-before", s.recv(16) == b"one\n")
    print("ready", flush=True)
    sys.stdin.readline()
    try:
        s.sendall(b"two\n")
        report("held-after", s.recv(16) == b"two\n")
    except Exception as exc:  # noqa: BLE001
        report("held-after", False, err_name(exc))
    try:
        report("new-after", http_get(host, int(port)))
    except Exception as exc:  # noqa: BLE001
        report("new-after", False, err_name(exc))


def wait_then(args):
    """Waits for 'go' on stdin, then runs the probes after it."""
    print("ready", flush=True)
    sys.stdin.readline()
    run(args)


def sleep_then(args):
    time.sleep(float(args[0]))
    run(args[1:])


def spawn_child(args):
    """Runs the remaining probes in a child process (nest with another 'child')."""
    pid = os.fork()
    if pid == 0:
        try:
            run(args)
        finally:
            sys.stdout.flush()
            os._exit(0)
    os.waitpid(pid, 0)


def run(args):
    i = 0
    while i < len(args):
        cmd = args[i]
        if cmd == "tcp4":
            probe_tcp(f"tcp4 {args[i+1]}:{args[i+2]}", args[i + 1], args[i + 2], socket.AF_INET)
            i += 3
        elif cmd == "tcp6":
            probe_tcp(f"tcp6 [{args[i+1]}]:{args[i+2]}", args[i + 1], args[i + 2], socket.AF_INET6)
            i += 3
        elif cmd == "udp4":
            probe_udp_sendto(f"udp4 {args[i+1]}:{args[i+2]}", args[i + 1], args[i + 2], socket.AF_INET)
            i += 3
        elif cmd == "udp6":
            probe_udp_sendto(f"udp6 [{args[i+1]}]:{args[i+2]}", args[i + 1], args[i + 2], socket.AF_INET6)
            i += 3
        elif cmd == "udp-flood":
            probe_udp_flood(f"udp-flood {args[i+1]}", args[i + 1], args[i + 2], args[i + 3])
            i += 4
        elif cmd == "udp-connect":
            probe_udp_connect(f"udp-connect {args[i+1]}:{args[i+2]}", args[i + 1], args[i + 2])
            i += 3
        elif cmd == "dns":
            probe_dns(f"dns {args[i+1]}:{args[i+2]}", args[i + 1], args[i + 2])
            i += 3
        elif cmd == "raw-icmp":
            probe_raw_icmp(f"raw-icmp {args[i+1]}", args[i + 1])
            i += 2
        elif cmd == "ping-socket":
            probe_ping_socket(f"ping-socket {args[i+1]}", args[i + 1])
            i += 2
        elif cmd == "packet":
            probe_packet("packet")
            i += 1
        elif cmd == "vsock":
            probe_vsock("vsock")
            i += 1
        elif cmd == "sock-packet":
            probe_sock_packet("sock-packet")
            i += 1
        elif cmd == "userns":
            probe_userns("userns")
            i += 1
        elif cmd == "ptrace":
            probe_ptrace("ptrace")
            i += 1
        elif cmd == "pidfd-getfd":
            probe_pidfd_getfd("pidfd-getfd")
            i += 1
        elif cmd == "io-uring":
            probe_io_uring("io-uring")
            i += 1
        elif cmd == "fd":
            probe_fd(f"fd {args[i+1]}", args[i + 1])
            i += 2
        elif cmd == "env":
            probe_env(f"env {args[i+1]}", args[i + 1])
            i += 2
        elif cmd == "identity":
            probe_identity("identity")
            i += 1
        elif cmd == "cgroup-escape":
            probe_cgroup_escape(f"cgroup-escape {args[i+1]}", args[i + 1])
            i += 2
        elif cmd == "http":
            probe_http(f"http {args[i+1]} {args[i+2]}", args[i + 1], args[i + 2], args[i + 3])
            i += 4
        elif cmd == "read":
            probe_read(f"read {args[i+1]}", args[i + 1])
            i += 2
        elif cmd == "unix":
            probe_unix(f"unix {args[i+1]}", args[i + 1])
            i += 2
        elif cmd == "bind4":
            probe_bind(f"bind4 {args[i+1]}:{args[i+2]}", args[i + 1], args[i + 2], socket.AF_INET)
            i += 3
        elif cmd == "bind6":
            probe_bind(f"bind6 [{args[i+1]}]:{args[i+2]}", args[i + 1], args[i + 2], socket.AF_INET6)
            i += 3
        elif cmd == "abstract":
            probe_abstract(f"abstract {args[i+1]}", args[i + 1])
            i += 2
        elif cmd == "abstract-self":
            probe_abstract_self("abstract-self")
            i += 1
        elif cmd == "hold":
            hold(args[i + 1], args[i + 2])
            i += 3
        elif cmd == "wait":
            wait_then(args[i + 1:])
            return
        elif cmd == "sleep":
            sleep_then(args[i + 1:])
            return
        elif cmd == "child":
            spawn_child(args[i + 1:])
            return
        else:
            report(cmd, False, "unknown probe")
            i += 1


if __name__ == "__main__":
    run(sys.argv[1:])
