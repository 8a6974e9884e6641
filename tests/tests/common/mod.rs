//! Shared harness of the privileged end-to-end tests: the enforcer binary, an isolated
//! enforcer instance (own pin directory and cgroup parent) per test, real servers on
//! loopback, and the probe script the confined agent runs.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::Duration,
};

/// True when the test may run. Without root it is skipped with a reason — unless `CI` is
/// set, where a missing privilege is a failure, not a skip.
pub fn privileged(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: needs root (loads BPF programs, creates cgroups) and CI is set");
    }
    eprintln!("skipping {test}: needs root (loads BPF programs, creates cgroups)");
    false
}

/// The `enforcer` binary under test: `ENFORCER_BIN`, or the workspace's debug build.
pub fn enforcer_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("ENFORCER_BIN") {
        return PathBuf::from(path);
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/enforcer");
    assert!(
        path.is_file(),
        "{} does not exist: run the tests with `cargo xtask test`, or build it with \
         `cargo build -p enforcer` (after `cargo xtask build-ebpf`)",
        path.display()
    );
    path
}

/// The probe script: `ENFORCER_PROBE`, or the one in the source tree. Test executables run
/// inside a VM, where the source tree does not exist, are told where it is.
pub fn probe_source() -> PathBuf {
    std::env::var_os("ENFORCER_PROBE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("probe.py"))
}

/// How much longer than on a normal machine a test gives to work that must fit in a time
/// window: `ENFORCER_TEST_TIME_SCALE` (a whole number, default 1). Under an emulated CPU,
/// starting python and importing urllib alone takes seconds, so a short-lived Envelope could
/// expire before the agent's first request; the test runner sets it there.
pub fn time_scale() -> u64 {
    std::env::var("ENFORCER_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n >= 1)
        .unwrap_or(1)
}

/// `secs` stretched by [`time_scale`].
pub fn scaled_secs(secs: u64) -> u64 {
    secs * time_scale()
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

/// One enforcer instance with its own pins and cgroup parent, so tests can run in parallel.
/// Dropping it kills its agents and removes every pin and cgroup, even when a test fails.
pub struct Instance {
    pub pin_dir: PathBuf,
    pub cgroup_parent: String,
    pub probe: PathBuf,
    _scratch: tempfile::TempDir,
}

impl Instance {
    pub fn new(test: &str) -> Self {
        let n = NEXT_ID.fetch_add(1, Ordering::SeqCst);
        let unique = format!("enforcer-test-{}-{n}-{test}", std::process::id());
        let scratch = tempfile::Builder::new()
            .prefix("enforcer-test-")
            .tempdir()
            .expect("tempdir");
        // The agent runs as an unprivileged uid: it must be able to read the probe script.
        let probe = scratch.path().join("probe.py");
        std::fs::copy(probe_source(), &probe).expect("copy probe");
        set_mode(scratch.path(), 0o755);
        set_mode(&probe, 0o644);
        Instance {
            pin_dir: PathBuf::from("/sys/fs/bpf").join(&unique),
            cgroup_parent: unique,
            probe,
            _scratch: scratch,
        }
    }

    /// `enforcer` with this instance's pins and cgroup parent.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(enforcer_bin());
        cmd.env("ENFORCER_PIN_DIR", &self.pin_dir)
            .env("ENFORCER_CGROUP_PARENT", &self.cgroup_parent)
            .env("RUST_LOG", "warn");
        cmd
    }

    /// `enforcer confine --gateway G --name NAME -- /bin/sh -c SCRIPT`.
    pub fn confine_shell(&self, gateway: SocketAddr, name: &str, script: &str) -> Command {
        let mut cmd = self.command();
        cmd.arg("confine")
            .arg("--gateway")
            .arg(gateway.to_string())
            .args(["--name", name, "--", "/bin/sh", "-c", script]);
        cmd
    }

    /// `enforcer confine --gateway G [extra…] -- python3 probe.py [probe args…]`.
    pub fn confine_command(
        &self,
        gateway: SocketAddr,
        extra: &[&str],
        probe_args: &[String],
    ) -> Command {
        let mut cmd = self.command();
        cmd.arg("confine").arg("--gateway").arg(gateway.to_string());
        cmd.args(extra);
        cmd.arg("--")
            .arg("/usr/bin/python3")
            .arg(&self.probe)
            .args(probe_args);
        cmd
    }

    /// `confine` of probes that print "ready" and wait (a `wait` or `hold` step), returned
    /// once they do, with what they printed so far.
    pub fn confine_until_ready(
        &self,
        gateway: SocketAddr,
        extra: &[&str],
        probe_args: &[String],
    ) -> (Child, BufReader<std::process::ChildStdout>, String) {
        let mut child = self
            .confine_command(gateway, extra, probe_args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn confine");
        let mut reader = BufReader::new(child.stdout.take().expect("stdout"));
        let mut seen = String::new();
        wait_for_line(&mut reader, "ready", &mut seen);
        (child, reader, seen)
    }

    /// Runs the probes confined and returns their results.
    pub fn confine(
        &self,
        gateway: SocketAddr,
        extra: &[&str],
        probe_args: &[String],
    ) -> (ExitStatus, Probes) {
        let output = self
            .confine_command(gateway, extra, probe_args)
            .stdin(Stdio::null())
            .output()
            .expect("run enforcer confine");
        let probes = Probes::parse(&output);
        (output.status, probes)
    }

    /// Runs the probes as root, without any confinement: proves each probe can succeed, so
    /// a denied probe under confinement means the enforcer denied it.
    pub fn unconfined(&self, probe_args: &[String]) -> Probes {
        let output = Command::new("/usr/bin/python3")
            .arg(&self.probe)
            .args(probe_args)
            .stdin(Stdio::null())
            .output()
            .expect("run probe");
        Probes::parse(&output)
    }

    pub fn cgroup_dir(&self) -> PathBuf {
        enforcer::sandbox::CgroupParent::locate(&self.cgroup_parent).expect("cgroup parent")
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let result = self.command().args(["unload", "--force"]).output();
        if let Ok(out) = &result
            && !out.status.success()
            && self.pin_dir.exists()
        {
            eprintln!(
                "cleanup of {} failed: {}",
                self.pin_dir.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Results of the probe script: one JSON line per probe.
#[derive(Debug)]
pub struct Probes {
    pub results: Vec<(String, bool, String)>,
    pub stderr: String,
}

impl Probes {
    pub fn parse(output: &Output) -> Self {
        Self::parse_text(
            &String::from_utf8_lossy(&output.stdout),
            &String::from_utf8_lossy(&output.stderr),
        )
    }

    pub fn parse_text(stdout: &str, stderr: &str) -> Self {
        let mut results = Vec::new();
        for line in stdout.lines() {
            if let Some(result) = parse_probe_line(line) {
                results.push(result);
            }
        }
        Probes {
            results,
            stderr: stderr.to_owned(),
        }
    }

    /// The outcome of the probe whose name starts with `prefix`.
    pub fn get(&self, prefix: &str) -> (bool, &str) {
        let found = self
            .results
            .iter()
            .find(|(name, _, _)| name.starts_with(prefix));
        match found {
            Some((_, ok, detail)) => (*ok, detail.as_str()),
            None => panic!(
                "no result for probe {prefix:?}; got {:?}\nstderr:\n{}",
                self.results, self.stderr
            ),
        }
    }

    pub fn assert_ok(&self, prefix: &str) {
        let (ok, detail) = self.get(prefix);
        assert!(
            ok,
            "probe {prefix} should succeed but failed ({detail})\nstderr:\n{}",
            self.stderr
        );
    }

    pub fn assert_denied(&self, prefix: &str) {
        let (ok, detail) = self.get(prefix);
        assert!(
            !ok,
            "probe {prefix} should be denied but succeeded\nstderr:\n{}",
            self.stderr
        );
        let _ = detail;
    }
}

fn parse_probe_line(line: &str) -> Option<(String, bool, String)> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    Some((
        value.get("probe")?.as_str()?.to_owned(),
        value.get("ok")?.as_bool()?,
        value.get("detail")?.as_str()?.to_owned(),
    ))
}

/// A TCP server on loopback: answers HTTP requests with 200 and echoes anything else line
/// by line. Counts the connections it accepted.
pub struct Server {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Server {
    pub fn start(bind: &str) -> Self {
        let listener = TcpListener::bind(bind).unwrap_or_else(|e| panic!("bind {bind}: {e}"));
        let addr = listener.local_addr().expect("local addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (accepted2, stop2) = (accepted.clone(), stop.clone());
        thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        accepted2.fetch_add(1, Ordering::SeqCst);
                        thread::spawn(move || serve(stream));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Server {
            addr,
            accepted,
            stop,
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn serve(stream: TcpStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    let mut first = String::new();
    if reader.read_line(&mut first).unwrap_or(0) == 0 {
        return;
    }
    if first.starts_with("GET ") {
        let _ = writer.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok");
        return;
    }
    let _ = writer.write_all(first.as_bytes());
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap_or(0) > 0 {
        if writer.write_all(line.as_bytes()).is_err() {
            return;
        }
        line.clear();
    }
}

/// A UDP socket on loopback that counts datagrams and answers DNS-shaped queries.
pub struct UdpServer {
    pub addr: SocketAddr,
    pub received: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl UdpServer {
    pub fn start(bind: &str) -> Self {
        let socket = UdpSocket::bind(bind).unwrap_or_else(|e| panic!("bind {bind}: {e}"));
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let addr = socket.local_addr().expect("local addr");
        let received = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (received2, stop2) = (received.clone(), stop.clone());
        thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !stop2.load(Ordering::SeqCst) {
                if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                    received2.fetch_add(1, Ordering::SeqCst);
                    if n >= 12 {
                        // A DNS answer: same id and question, QR set, no records.
                        let mut reply = buf[..n].to_vec();
                        reply[2] = 0x81;
                        reply[3] = 0x80;
                        let _ = socket.send_to(&reply, peer);
                    }
                }
            }
        });
        UdpServer {
            addr,
            received,
            stop,
        }
    }

    pub fn received(&self) -> usize {
        self.received.load(Ordering::SeqCst)
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Reads lines from a child's stdout until one equals `want`.
pub fn wait_for_line(reader: &mut impl BufRead, want: &str, seen: &mut String) {
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).expect("read agent output");
        assert!(n > 0, "agent output ended before {want:?}; got:\n{seen}");
        seen.push_str(&line);
        if line.trim() == want {
            return;
        }
    }
}

/// Tells a probe that waits (its `wait` step) to go on.
pub fn go(child: &mut Child) {
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"go\n")
        .expect("go");
}

/// Tells a probe that waits (its `wait` step) to go on, then collects the rest.
pub fn go_and_finish(mut child: Child, reader: impl Read, seen: String) -> (ExitStatus, Probes) {
    go(&mut child);
    finish(child, reader, seen)
}

/// Collects the rest of a child's output after it exits.
pub fn finish(mut child: Child, mut reader: impl Read, mut seen: String) -> (ExitStatus, Probes) {
    let mut rest = String::new();
    let _ = reader.read_to_string(&mut rest);
    seen.push_str(&rest);
    let status = child.wait().expect("wait");
    let mut stderr = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut stderr);
    }
    (status, Probes::parse_text(&seen, &stderr))
}

pub fn args(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// A network namespace of the test's own, with loopback up; deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(test: &str) -> Self {
        let n = NEXT_ID.fetch_add(1, Ordering::SeqCst);
        let name = format!("enf-{}-{n}-{test}", std::process::id());
        let ns = NetNs { name };
        ns.ip(&["netns", "add", &ns.name]);
        ns.ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    fn ip(&self, args: &[&str]) {
        let out = Command::new("ip").args(args).output().expect("run ip");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `nsenter --net`, not `ip netns exec`: the latter remounts /sys, which would hide the
    /// cgroup and bpffs mounts the enforcer needs.
    fn nsenter(&self) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.name)).arg("--");
        cmd
    }

    /// Runs a command inside the namespace and requires success.
    pub fn run(&self, args: &[&str]) {
        let out = self.nsenter().args(args).output().expect("nsenter");
        assert!(
            out.status.success(),
            "{args:?} in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs `command` inside the namespace and returns its output.
    pub fn output(&self, command: &mut Command) -> Output {
        let mut wrapped = self.nsenter();
        wrapped.arg(command.get_program()).args(command.get_args());
        for (key, value) in command.get_envs() {
            match value {
                Some(value) => wrapped.env(key, value),
                None => wrapped.env_remove(key),
            };
        }
        wrapped.stdin(Stdio::null()).output().expect("nsenter")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
