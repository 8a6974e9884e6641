//! The escape suite: a confined agent (real python3 and curl, as a uid of its own, in its own
//! cgroup with the real BPF programs attached) tries every way out it can think of. Each
//! attempt must fail while its own gateway stays reachable, and each attempt is first shown
//! to succeed without confinement, so a pass means the enforcer denied it.
mod common;

use std::{
    io::{BufReader, Write},
    process::Stdio,
    time::{Duration, Instant},
};

use common::{Instance, Server, UdpServer, args, finish, go_and_finish, privileged, wait_for_line};

#[test]
fn only_the_gateway_is_reachable_over_tcp() {
    if !privileged("only_the_gateway_is_reachable_over_tcp") {
        return;
    }
    let inst = Instance::new("tcp");
    let gateway = Server::start("127.0.0.1:0");
    let other_port = Server::start("127.0.0.1:0");
    let other_addr = Server::start("127.0.0.2:0");
    let v6 = Server::start("[::1]:0");
    let probes = args(&[
        "tcp4",
        "127.0.0.1",
        &gateway.addr.port().to_string(),
        "tcp4",
        "127.0.0.1",
        &other_port.addr.port().to_string(),
        "tcp4",
        "127.0.0.2",
        &other_addr.addr.port().to_string(),
        "tcp6",
        "::1",
        &v6.addr.port().to_string(),
        "tcp6",
        "::ffff:127.0.0.1",
        &other_port.addr.port().to_string(),
        "tcp6",
        "::ffff:127.0.0.1",
        &gateway.addr.port().to_string(),
    ]);
    let control = inst.unconfined(&probes);
    for probe in [
        "tcp4 127.0.0.1",
        "tcp4 127.0.0.2",
        "tcp6 [::1]",
        "tcp6 [::ffff:127.0.0.1]",
    ] {
        control.assert_ok(probe);
    }
    let accepted_before = (other_port.accepted(), other_addr.accepted(), v6.accepted());

    let (status, confined) = inst.confine(gateway.addr, &[], &probes);
    assert!(status.success(), "confine failed: {}", confined.stderr);
    confined.assert_ok(&format!("tcp4 127.0.0.1:{}", gateway.addr.port()));
    confined.assert_denied(&format!("tcp4 127.0.0.1:{}", other_port.addr.port()));
    confined.assert_denied("tcp4 127.0.0.2");
    confined.assert_denied("tcp6 [::1]");
    // IPv4-mapped IPv6 is judged as IPv4: the gateway passes, anything else does not.
    confined.assert_denied(&format!(
        "tcp6 [::ffff:127.0.0.1]:{}",
        other_port.addr.port()
    ));
    confined.assert_ok(&format!("tcp6 [::ffff:127.0.0.1]:{}", gateway.addr.port()));
    assert_eq!(
        (other_port.accepted(), other_addr.accepted(), v6.accepted()),
        accepted_before
    );
    // The denial reached userspace through the ring buffer and was logged.
    assert!(
        confined.stderr.contains("connect4 denied (not_gateway)"),
        "stderr:\n{}",
        confined.stderr
    );
}

#[test]
fn curl_reaches_the_gateway_and_nothing_else() {
    if !privileged("curl_reaches_the_gateway_and_nothing_else") {
        return;
    }
    let inst = Instance::new("curl");
    let gateway = Server::start("127.0.0.1:0");
    let other = Server::start("127.0.0.3:0");
    let script = format!(
        "curl -s -m 3 -o /dev/null -w 'gateway=%{{http_code}}\\n' http://{}/ ; \
         curl -s -m 3 -o /dev/null -w 'other=%{{http_code}}\\n' http://{}/ ; true",
        gateway.addr, other.addr
    );
    let out = inst
        .command()
        .args([
            "confine",
            "--gateway",
            &gateway.addr.to_string(),
            "--",
            "/bin/sh",
            "-c",
            &script,
        ])
        .output()
        .expect("run confine");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("gateway=200"), "stdout: {stdout}");
    assert!(stdout.contains("other=000"), "stdout: {stdout}");
    assert_eq!(other.accepted(), 0);
}

#[test]
fn udp_dns_and_connected_udp_are_denied() {
    if !privileged("udp_dns_and_connected_udp_are_denied") {
        return;
    }
    let inst = Instance::new("udp");
    let gateway = Server::start("127.0.0.1:0");
    let udp4 = UdpServer::start("127.0.0.1:0");
    let udp6 = UdpServer::start("[::1]:0");
    let probes = args(&[
        "udp4",
        "127.0.0.1",
        &udp4.addr.port().to_string(),
        "udp6",
        "::1",
        &udp6.addr.port().to_string(),
        "udp-connect",
        "127.0.0.1",
        &udp4.addr.port().to_string(),
        "dns",
        "127.0.0.1",
        &udp4.addr.port().to_string(),
    ]);
    let control = inst.unconfined(&probes);
    for probe in ["udp4", "udp6", "udp-connect", "dns"] {
        control.assert_ok(probe);
    }
    std::thread::sleep(Duration::from_millis(200));
    let before = (udp4.received(), udp6.received());
    assert!(
        before.0 >= 3 && before.1 >= 1,
        "control datagrams did not arrive: {before:?}"
    );

    let (status, confined) = inst.confine(gateway.addr, &[], &probes);
    assert!(status.success(), "confine failed: {}", confined.stderr);
    for probe in ["udp4", "udp6", "udp-connect", "dns"] {
        confined.assert_denied(probe);
    }
    assert_eq!(confined.get("udp4").1, "EPERM");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        (udp4.received(), udp6.received()),
        before,
        "a confined datagram arrived"
    );
}

#[test]
fn a_denial_loop_is_counted_exactly_but_reported_within_a_budget() {
    if !privileged("a_denial_loop_is_counted_exactly_but_reported_within_a_budget") {
        return;
    }
    let inst = Instance::new("flood");
    let gateway = Server::start("127.0.0.1:0");
    let sink = UdpServer::start("127.0.0.1:0");
    let port = sink.addr.port().to_string();
    let flood = 20_000;
    let (status, confined) = inst.confine(
        gateway.addr,
        &[],
        &args(&["udp-flood", &flood.to_string(), "127.0.0.1", &port]),
    );
    assert!(status.success(), "confine failed: {}", confined.stderr);
    confined.assert_denied("udp-flood");
    assert_eq!(
        confined.get("udp-flood").1,
        flood.to_string(),
        "every send denied"
    );
    // Each CPU reports at most EVENTS_PER_WINDOW a second per agent; the loop may span a
    // window boundary, and a second.
    let reported = confined.stderr.matches("kernel denied").count() as u64;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let bound = 3 * enforcer_common::EVENTS_PER_WINDOW * cpus;
    assert!(
        (1..=bound).contains(&reported),
        "{reported} deny events reported for {flood} denials (bound {bound})"
    );
}

#[test]
fn raw_icmp_ping_and_packet_sockets_are_denied() {
    if !privileged("raw_icmp_ping_and_packet_sockets_are_denied") {
        return;
    }
    let inst = Instance::new("raw");
    let gateway = Server::start("127.0.0.1:0");
    let probes = args(&[
        "raw-icmp",
        "127.0.0.1",
        "ping-socket",
        "127.0.0.1",
        "packet",
    ]);
    // As root and unconfined, all three work.
    let control = inst.unconfined(&probes);
    for probe in ["raw-icmp", "packet"] {
        control.assert_ok(probe);
    }
    let (status, confined) = inst.confine(gateway.addr, &[], &probes);
    assert!(status.success(), "confine failed: {}", confined.stderr);
    for probe in ["raw-icmp", "ping-socket", "packet"] {
        confined.assert_denied(probe);
    }

    // Here an unprivileged user lacks the capabilities for all three anyway. Ping sockets,
    // though, are open to every group on hosts whose ping_group_range allows it: in a
    // network namespace of the test's own with such a range, an unconfined `nobody` can
    // ping, and only the kernel program stops the confined one.
    let netns = common::NetNs::new("ping");
    netns.run(&[
        "sysctl",
        "-q",
        "-w",
        "net.ipv4.ping_group_range=0 2147483647",
    ]);
    let probe = args(&["ping-socket", "127.0.0.1"]);
    let control = netns.output(
        std::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "/usr/bin/python3",
            ])
            .arg(&inst.probe)
            .args(&probe),
    );
    common::Probes::parse(&control).assert_ok("ping-socket");
    let confined = netns.output(&mut inst.confine_command(gateway.addr, &[], &probe));
    let confined = common::Probes::parse(&confined);
    confined.assert_denied("ping-socket");
    assert!(
        confined.stderr.contains("sock_create denied (socket_kind)"),
        "stderr:\n{}",
        confined.stderr
    );
}

#[test]
fn children_and_grandchildren_are_confined_too() {
    if !privileged("children_and_grandchildren_are_confined_too") {
        return;
    }
    let inst = Instance::new("children");
    let gateway = Server::start("127.0.0.1:0");
    let other = Server::start("127.0.0.2:0");
    let gw_port = gateway.addr.port().to_string();
    let other_port = other.addr.port().to_string();
    let probes = args(&[
        "child",
        "tcp4",
        "127.0.0.1",
        &gw_port,
        "tcp4",
        "127.0.0.2",
        &other_port,
        "child",
        "tcp4",
        "127.0.0.1",
        &gw_port,
        "tcp4",
        "127.0.0.2",
        &other_port,
    ]);
    let (status, confined) = inst.confine(gateway.addr, &[], &probes);
    assert!(status.success(), "confine failed: {}", confined.stderr);
    let gateway_ok = confined
        .results
        .iter()
        .filter(|(n, ok, _)| n.starts_with("tcp4 127.0.0.1") && *ok)
        .count();
    let other_denied = confined
        .results
        .iter()
        .filter(|(n, ok, _)| n.starts_with("tcp4 127.0.0.2") && !*ok)
        .count();
    assert_eq!(
        (gateway_ok, other_denied),
        (2, 2),
        "results: {:?}",
        confined.results
    );
    assert_eq!(other.accepted(), 0);
}

#[test]
fn calls_that_reach_past_the_kernel_programs_are_refused() {
    if !privileged("calls_that_reach_past_the_kernel_programs_are_refused") {
        return;
    }
    let inst = Instance::new("seccomp");
    let gateway = Server::start("127.0.0.1:0");
    let probes = args(&[
        "vsock",
        "sock-packet",
        "ptrace",
        "pidfd-getfd",
        "io-uring",
        "userns",
    ]);
    // Unconfined, a process may take over its own child and copy its descriptors.
    let control = inst.unconfined(&probes);
    control.assert_ok("ptrace");
    control.assert_ok("pidfd-getfd");
    let (status, confined) = inst.confine(gateway.addr, &[], &probes);
    assert!(status.success(), "confine failed: {}", confined.stderr);
    // The answers are the filter's own: a kernel without vsock or io_uring says otherwise.
    for (probe, answer) in [
        ("vsock", "EAFNOSUPPORT"),
        // The kernel's own answer would be EPERM (no CAP_NET_RAW), or a packet socket in a
        // user namespace of the agent's.
        ("sock-packet", "EAFNOSUPPORT"),
        ("userns", "EPERM"),
        ("ptrace", "EPERM"),
        ("pidfd-getfd", "EPERM"),
        ("io-uring", "ENOSYS"),
    ] {
        confined.assert_denied(probe);
        assert_eq!(confined.get(probe).1, answer, "{probe}");
    }
}

#[test]
fn the_agent_starts_with_nothing_of_its_caller_and_a_uid_of_its_own() {
    if !privileged("the_agent_starts_with_nothing_of_its_caller_and_a_uid_of_its_own") {
        return;
    }
    use std::os::{fd::AsRawFd, unix::process::CommandExt};
    let inst = Instance::new("caller");
    let gateway = Server::start("127.0.0.1:0");
    // A socket the caller forgot to mark close-on-exec, opened outside any agent cgroup.
    let leaked = std::net::TcpStream::connect(gateway.addr).expect("connect");
    let leaked_fd = leaked.as_raw_fd();
    let probes = args(&[
        "fd",
        "7",
        "env",
        "OPERATOR_TOKEN",
        "env",
        "GIVEN",
        "identity",
        "sleep",
        "1",
        "identity",
    ]);
    let start = || {
        let mut cmd = inst.confine_command(gateway.addr, &["--env", "GIVEN=yes"], &probes);
        cmd.env("OPERATOR_TOKEN", "ghp_operator")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: dup2(2) in the child before exec; the new descriptor is inheritable.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(leaked_fd, 7) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn().expect("confine")
    };
    // Two at once, to see that each gets a uid of its own.
    let (a, b) = (start(), start());
    let outputs = [a, b].map(|child| child.wait_with_output().expect("confine"));
    let mut uids = Vec::new();
    for out in &outputs {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let probes = common::Probes::parse(out);
        probes.assert_denied("fd 7");
        probes.assert_denied("env OPERATOR_TOKEN");
        probes.assert_ok("env GIVEN");
        probes.assert_ok("identity");
        let (uid, gid) = probes
            .get("identity")
            .1
            .split_once(' ')
            .map(|(u, g)| (u.parse::<u32>().unwrap(), g.parse::<u32>().unwrap()))
            .unwrap();
        assert!(enforcer::sandbox::AGENT_UIDS.contains(&uid), "uid {uid}");
        assert_eq!(uid, gid);
        uids.push(uid);
    }
    assert_ne!(uids[0], uids[1], "two agents shared a uid");
    drop(leaked);
}

#[test]
fn homes_left_by_a_killed_enforcer_are_swept_at_the_next_start() {
    if !privileged("homes_left_by_a_killed_enforcer_are_swept_at_the_next_start") {
        return;
    }
    let inst = Instance::new("homes");
    let gateway = Server::start("127.0.0.1:0");
    // What `confine` killed with SIGKILL leaves: a home owned by an agent uid that no
    // process has any more.
    let uid = enforcer::sandbox::AGENT_UIDS.end - 7;
    let stale = std::env::temp_dir().join(format!("enforcer-home-stale{}", std::process::id()));
    std::fs::create_dir(&stale).expect("stale home");
    std::fs::write(stale.join("left-behind"), "x").expect("a file in it");
    std::os::unix::fs::chown(&stale, Some(uid), Some(uid)).expect("chown");
    let (status, confined) = inst.confine(gateway.addr, &[], &args(&[]));
    let swept = !stale.exists();
    let _ = std::fs::remove_dir_all(&stale);
    assert!(status.success(), "confine failed: {}", confined.stderr);
    assert!(swept, "{} is still there", stale.display());
}

#[test]
fn the_agent_cannot_move_itself_to_another_cgroup() {
    if !privileged("the_agent_cannot_move_itself_to_another_cgroup") {
        return;
    }
    let inst = Instance::new("cgmove");
    let gateway = Server::start("127.0.0.1:0");
    // Make sure the parent exists before naming its files.
    let (status, _) = inst.confine(gateway.addr, &[], &args(&[]));
    assert!(status.success());
    let parent_procs = inst.cgroup_dir().join("cgroup.procs");
    let root_procs = enforcer::sandbox::cgroup2_mount()
        .expect("cgroup2")
        .join("cgroup.procs");
    let probes = args(&[
        "cgroup-escape",
        parent_procs.to_str().unwrap(),
        "cgroup-escape",
        root_procs.to_str().unwrap(),
    ]);
    let (status, confined) = inst.confine(gateway.addr, &[], &probes);
    assert!(status.success(), "confine failed: {}", confined.stderr);
    confined.assert_denied(&format!("cgroup-escape {}", parent_procs.display()));
    confined.assert_denied(&format!("cgroup-escape {}", root_procs.display()));
}

#[test]
fn trip_cuts_new_and_established_connections() {
    if !privileged("trip_cuts_new_and_established_connections") {
        return;
    }
    let inst = Instance::new("trip");
    let gateway = Server::start("127.0.0.1:0");
    let (child, reader, seen) = inst.confine_until_ready(
        gateway.addr,
        &["--name", "tripme"],
        &args(&["hold", "127.0.0.1", &gateway.addr.port().to_string()]),
    );

    let out = inst
        .command()
        .args(["trip", "tripme"])
        .output()
        .expect("trip");
    assert!(
        out.status.success(),
        "trip failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = inst
        .command()
        .args(["status", "--json"])
        .output()
        .expect("status");
    assert!(String::from_utf8_lossy(&status.stdout).contains("\"state\":\"tripped\""));

    let (status, probes) = go_and_finish(child, reader, seen);
    assert!(status.success(), "confine failed: {}", probes.stderr);
    probes.assert_ok("held-before");
    probes.assert_denied("held-after");
    probes.assert_denied("new-after");
    assert!(
        probes.stderr.contains("skb_egress denied (tripped)"),
        "stderr:\n{}",
        probes.stderr
    );
}

#[test]
fn the_agent_stays_confined_when_the_enforcer_is_killed() {
    if !privileged("the_agent_stays_confined_when_the_enforcer_is_killed") {
        return;
    }
    let inst = Instance::new("sigkill");
    let gateway = Server::start("127.0.0.1:0");
    let other = Server::start("127.0.0.2:0");
    let mut child = inst
        .confine_command(
            gateway.addr,
            &[],
            &args(&[
                "wait",
                "tcp4",
                "127.0.0.2",
                &other.addr.port().to_string(),
                "tcp4",
                "127.0.0.1",
                &gateway.addr.port().to_string(),
            ]),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn confine");
    let mut reader = BufReader::new(child.stdout.take().expect("stdout"));
    let mut seen = String::new();
    wait_for_line(&mut reader, "ready", &mut seen);
    // Waiting on the enforcer would close the agent's stdin, so keep it first.
    let mut agent_stdin = child.stdin.take().expect("stdin");
    child.kill().expect("SIGKILL the enforcer");
    child.wait().expect("reap the enforcer");

    agent_stdin.write_all(b"go\n").expect("go");
    drop(agent_stdin);
    let (_, probes) = finish(child, reader, seen);
    probes.assert_denied("tcp4 127.0.0.2");
    probes.assert_ok("tcp4 127.0.0.1");
    assert_eq!(other.accepted(), 0);
}

/// A port on `ip` that nothing listens on.
fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

#[test]
fn no_agent_may_listen_on_a_gateways_port() {
    if !privileged("no_agent_may_listen_on_a_gateways_port") {
        return;
    }
    let inst = Instance::new("bind");
    // Neither gateway listens, as when the daemon serving them was killed: whoever binds
    // a gateway's port then gets its agent's requests.
    let first_gateway: std::net::SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
        .parse()
        .expect("addr");
    let second_gateway: std::net::SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
        .parse()
        .expect("addr");
    let (first, second) = (
        first_gateway.port().to_string(),
        second_gateway.port().to_string(),
    );
    let elsewhere = free_port("127.0.0.1").to_string();
    let probes = args(&[
        "bind4",
        "127.0.0.1",
        &first,
        "bind4",
        "0.0.0.0",
        &first,
        "bind6",
        "::",
        &first,
        "bind6",
        "::ffff:127.0.0.1",
        &first,
        "bind4",
        "127.0.0.1",
        &second,
        "bind4",
        "127.0.0.1",
        &elsewhere,
        "bind4",
        "127.0.0.1",
        "0",
    ]);
    let control = inst.unconfined(&probes);
    for probe in ["bind4", "bind6 [::]", "bind6 [::ffff:127.0.0.1]"] {
        control.assert_ok(probe);
    }
    control.assert_ok(&format!("bind4 127.0.0.1:{second}"));

    // The first agent holds its gateway's port; the second tries to take it, and its own.
    let (holder, reader, seen) = inst.confine_until_ready(first_gateway, &[], &args(&["wait"]));
    let (status, confined) = inst.confine(second_gateway, &[], &probes);
    let (_, held) = go_and_finish(holder, reader, seen);
    assert!(status.success(), "confine failed: {}", confined.stderr);
    for probe in [
        format!("bind4 127.0.0.1:{first}"),
        format!("bind4 0.0.0.0:{first}"),
        format!("bind6 [::]:{first}"),
        format!("bind6 [::ffff:127.0.0.1]:{first}"),
        format!("bind4 127.0.0.1:{second}"),
    ] {
        confined.assert_denied(&probe);
        assert_eq!(confined.get(&probe).1, "EPERM", "{probe}");
    }
    confined.assert_ok(&format!("bind4 127.0.0.1:{elsewhere}"));
    confined.assert_ok("bind4 127.0.0.1:0");
    // Both enforcer processes read the pins' deny events; either may log a denial.
    let logged = format!("{}{}", confined.stderr, held.stderr);
    assert!(
        logged.contains("bind4 denied (gateway_port)")
            && logged.contains("bind6 denied (gateway_port)"),
        "stderr:\n{logged}"
    );
    // Once no entry names it, the port is anyone's again.
    let after = inst.confine(second_gateway, &[], &args(&["bind4", "127.0.0.1", &first]));
    after.1.assert_ok("bind4 127.0.0.1");
}

#[test]
fn a_port_two_gateways_share_stays_reserved_until_neither_uses_it() {
    if !privileged("a_port_two_gateways_share_stays_reserved_until_neither_uses_it") {
        return;
    }
    let inst = Instance::new("sharedport");
    let port = free_port("127.0.0.2");
    let first: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let second: std::net::SocketAddr = format!("127.0.0.2:{port}").parse().expect("addr");
    let elsewhere: std::net::SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
        .parse()
        .expect("addr");
    // Whether the kernel refused the agent a bind of the port (EPERM); another process
    // of the host may hold the port meanwhile, which fails the bind in another way.
    let refused = || {
        let (_, probes) = inst.confine(
            elsewhere,
            &[],
            &args(&["bind4", "0.0.0.0", &port.to_string()]),
        );
        let (ok, detail) = probes.get("bind4");
        !ok && detail == "EPERM"
    };
    let (a, a_out, a_seen) = inst.confine_until_ready(first, &[], &args(&["wait"]));
    let (b, b_out, b_seen) = inst.confine_until_ready(second, &[], &args(&["wait"]));
    assert!(refused(), "bound while two gateways use the port");
    // The last one written ends first: the port stays reserved for the other.
    go_and_finish(b, b_out, b_seen);
    assert!(refused(), "bound while a gateway still uses the port");
    go_and_finish(a, a_out, a_seen);
    assert!(
        !refused(),
        "the port stayed reserved after both gateways ended"
    );
}

#[test]
fn abstract_unix_sockets_of_the_host_are_out_of_reach() {
    use std::os::{linux::net::SocketAddrExt, unix::net::UnixListener};
    if !privileged("abstract_unix_sockets_of_the_host_are_out_of_reach") {
        return;
    }
    let inst = Instance::new("abstract");
    let gateway = Server::start("127.0.0.1:0");
    // A host service listening on an abstract socket, which has no file permissions.
    let name = format!(
        "enforcer-test-{}-{}",
        std::process::id(),
        inst.cgroup_parent.len()
    );
    let addr =
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract name");
    let listener = UnixListener::bind_addr(&addr).expect("bind the abstract socket");
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            if stream.is_ok() {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    let probes = args(&["abstract", &name, "abstract-self"]);
    let control = inst.unconfined(&probes);
    control.assert_ok("abstract enforcer-test");
    control.assert_ok("abstract-self");
    let before = accepted.load(std::sync::atomic::Ordering::SeqCst);

    let (status, confined) = inst.confine(gateway.addr, &[], &probes);
    assert!(status.success(), "confine failed: {}", confined.stderr);
    // Its own abstract sockets still work: only the host's are out of reach.
    confined.assert_ok("abstract-self");
    if enforcer::sandbox::landlock::abi_version() >= 6 {
        confined.assert_denied("abstract enforcer-test");
        assert_eq!(confined.get("abstract enforcer-test").1, "EPERM");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), before);
    } else {
        // Without Landlock scopes the kernel cannot tell, and the enforcer says so.
        assert!(
            confined.stderr.contains("no Landlock scopes"),
            "stderr:\n{}",
            confined.stderr
        );
    }
}

#[test]
fn the_kernel_cuts_the_agent_off_when_its_ttl_passes() {
    if !privileged("the_kernel_cuts_the_agent_off_when_its_ttl_passes") {
        return;
    }
    let inst = Instance::new("ttl");
    let gateway = Server::start("127.0.0.1:0");
    let port = gateway.addr.port().to_string();
    let started = Instant::now();
    let (status, probes) = inst.confine(
        gateway.addr,
        &["--ttl", "2"],
        &args(&[
            "tcp4",
            "127.0.0.1",
            &port,
            "sleep",
            "2.5",
            "tcp4",
            "127.0.0.1",
            &port,
        ]),
    );
    assert!(status.success(), "confine failed: {}", probes.stderr);
    assert!(started.elapsed() >= Duration::from_secs(2));
    let gateway_results: Vec<bool> = probes.results.iter().map(|(_, ok, _)| *ok).collect();
    assert_eq!(
        gateway_results,
        vec![true, false],
        "stderr:\n{}",
        probes.stderr
    );
    assert!(
        probes.stderr.contains("(expired)"),
        "stderr:\n{}",
        probes.stderr
    );
}

#[test]
fn a_closed_stderr_does_not_stop_confine_from_cleaning_up() {
    if !privileged("a_closed_stderr_does_not_stop_confine_from_cleaning_up") {
        return;
    }
    let inst = Instance::new("closed-stderr");
    let gateway = Server::start("127.0.0.1:0");
    // A pipe whose reader is gone, as when `confine … 2>&1 | head -1` has printed its line:
    // every line confine writes to stderr fails with EPIPE.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = inst
        .confine_shell(gateway.addr, "unheard", "sleep 60 & sleep 0.2; exit 4")
        .stderr(writer)
        .output()
        .expect("confine");
    assert_eq!(
        out.status.code(),
        Some(4),
        "the agent's exit code, not a panic's"
    );
    assert!(
        !inst.cgroup_dir().join("unheard").exists(),
        "agent cgroup left behind"
    );
}

#[test]
fn cleanup_leaves_no_cgroup_or_policy_behind() {
    if !privileged("cleanup_leaves_no_cgroup_or_policy_behind") {
        return;
    }
    let inst = Instance::new("cleanup");
    let gateway = Server::start("127.0.0.1:0");
    // The agent leaves a background process behind; confine must kill it on exit.
    let out = inst
        .confine_shell(gateway.addr, "leaver", "sleep 60 & exit 3")
        .output()
        .expect("confine");
    assert_eq!(out.status.code(), Some(3), "exit code passes through");
    assert!(
        !inst.cgroup_dir().join("leaver").exists(),
        "agent cgroup left behind"
    );
    let status = inst
        .command()
        .args(["status", "--json"])
        .output()
        .expect("status");
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("\"agents\":[]"),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );
}
