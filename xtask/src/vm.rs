//! `cargo xtask vm-test`: the privileged suites on other kernels. Each kernel is a Debian
//! cloud kernel package; the guest's only filesystem is an initramfs holding the test
//! executables, everything they run, and an `/init` that runs them and prints one verdict
//! line. The cloud kernels have no 9p or virtiofs, so nothing is shared with the host.
use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead, BufReader, Write},
    os::unix::fs::{PermissionsExt, symlink},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{build_enforcer, run, setup, workspace_root};

/// The kernel tested when none is named: Debian bookworm's own.
pub const DEFAULT_KERNEL: &str = "6.1";

const SUCCESS: &str = "vm-test: success";
const FAILURE: &str = "vm-test: failure";
/// Printed by `/init` once it runs: tells a kernel that never reached userspace apart from
/// tests that hang.
const INIT_STARTED: &str = "vm-init: started";

/// How much the suites stretch their time windows under TCG, which runs the guest several
/// times slower than the host (an agent's python needs seconds to import urllib). The
/// kernel hands `NAME=value` words of its command line it does not know to `/init` as
/// environment variables.
const TCG_TIME_SCALE: u32 = 3;

/// Where the guest finds what the host build produced.
const GUEST_DIR: &str = "/vm-test";
const GUEST_ENFORCER: &str = "/usr/bin/enforcer";

/// The privileged suites run in the guest (integration test targets of `enforcer-tests`).
const SUITES: &[&str] = &["escape", "pins", "daemon"];

/// Commands the suites and the enforcer run in the guest, besides busybox's applets.
const GUEST_COMMANDS: &[&str] = &[
    "/usr/bin/python3",
    "curl",
    "setpriv",
    "nsenter",
    "ip",
    "sysctl",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// KVM when a short trial boot under KVM comes up, TCG otherwise.
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Kernel to boot: a Debian cloud kernel version such as `6.1`, `6.12` (the newest
    /// package of that series) or an exact one such as `6.1.0-56`. Repeat for several.
    #[arg(long = "kernel", value_name = "VERSION")]
    pub kernels: Vec<String>,
    /// Wall-clock limit per kernel, in seconds.
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1536)]
    pub memory: u32,
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    pub accel: Accel,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            kernels: Vec::new(),
            timeout: 900,
            memory: 1536,
            accel: Accel::Auto,
        }
    }
}

/// The VM stage of `cargo xtask test`: the default kernel, skipped with a note where the
/// host cannot run amd64 guests' userspace (the initramfs holds the host's own binaries).
pub fn after_host_tests() -> anyhow::Result<()> {
    if std::env::consts::ARCH != "x86_64" {
        eprintln!(
            "xtask: skipping the kernel VMs: they boot amd64 kernels with this host's \
             binaries, and this host is {}",
            std::env::consts::ARCH
        );
        return Ok(());
    }
    run_vm_tests(&Args::default())
}

pub fn run_vm_tests(args: &Args) -> anyhow::Result<()> {
    if std::env::consts::ARCH != "x86_64" {
        bail!(
            "vm-test boots amd64 kernels with this host's binaries; this host is {}",
            std::env::consts::ARCH
        );
    }
    let kernels = if args.kernels.is_empty() {
        vec![DEFAULT_KERNEL.to_owned()]
    } else {
        args.kernels.clone()
    };
    ensure_host_tools()?;
    let vm_dir = workspace_root().join("target/vm");
    fs::create_dir_all(&vm_dir).with_context(|| format!("creating {}", vm_dir.display()))?;

    // Resolve and fetch every kernel before the long build, so a bad name fails fast.
    let mut images = Vec::new();
    for version in &kernels {
        images.push(fetch_kernel(&vm_dir, version)?);
    }
    let initramfs = build_initramfs(&vm_dir, &images)?;

    let mut accel = args.accel;
    let mut results = Vec::new();
    for kernel in &images {
        let started = Instant::now();
        let outcome = boot(kernel, &initramfs, args, &mut accel, &vm_dir)?;
        results.push((kernel.package.clone(), outcome, started.elapsed()));
    }

    eprintln!("\nvm-test results:");
    let mut failed = Vec::new();
    for (package, outcome, took) in &results {
        let verdict = match outcome {
            Outcome::Success => "passed".to_owned(),
            Outcome::Failure(why) => {
                failed.push(package.as_str());
                format!("FAILED: {why}")
            }
        };
        eprintln!("  {package:<40} {verdict} ({:.0} s)", took.as_secs_f64());
    }
    if !failed.is_empty() {
        bail!("the suites failed in the VM on {}", failed.join(", "));
    }
    Ok(())
}

/// qemu, a static busybox and cpio, plus the commands the suites run.
fn ensure_host_tools() -> anyhow::Result<()> {
    setup::test_packages()?;
    let mut missing = Vec::new();
    if !setup::command_exists("qemu-system-x86_64") {
        missing.push("qemu-system-x86");
    }
    if !setup::command_exists("cpio") {
        missing.push("cpio");
    }
    if !package_installed("busybox-static") {
        missing.push("busybox-static");
    }
    setup::apt_install(&missing)?;
    if !is_static(Path::new("/bin/busybox"))? {
        bail!("/bin/busybox is not statically linked; install the busybox-static package");
    }
    Ok(())
}

fn package_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn is_static(path: &Path) -> anyhow::Result<bool> {
    let out = Command::new("ldd")
        .arg(path)
        .output()
        .context("running ldd")?;
    Ok(!out.status.success() || String::from_utf8_lossy(&out.stdout).contains("not a dynamic"))
}

struct Kernel {
    package: String,
    vmlinuz: PathBuf,
}

/// Downloads and unpacks the newest Debian cloud kernel package matching `version`, once:
/// later runs reuse `target/vm/kernels`.
fn fetch_kernel(vm_dir: &Path, version: &str) -> anyhow::Result<Kernel> {
    let cache = vm_dir.join("kernels");
    fs::create_dir_all(&cache)?;
    let mut resolved = resolve_package(version)?;
    if resolved.is_none() && cached_package(&cache, version)?.is_none() {
        // A fresh machine may have no package lists at all yet.
        eprintln!(
            "xtask: no kernel package for {version} in the apt lists; running apt-get update"
        );
        run(Command::new("apt-get").args(["update", "-q"])).context("`apt-get update` failed")?;
        resolved = resolve_package(version)?;
    }
    let package = match resolved {
        Some(package) => package,
        None => match cached_package(&cache, version)? {
            Some(package) => {
                eprintln!(
                    "xtask: no package for kernel {version} in the apt lists; using cached {package}"
                );
                package
            }
            None => bail!(
                "no Debian cloud kernel package matches {version:?}: `apt-cache pkgnames \
                 linux-image-` lists none named linux-image-{version}…-cloud-amd64. Run \
                 `apt-get update`, or pick one of `apt-cache search linux-image | grep cloud-amd64`"
            ),
        },
    };
    let unpacked = cache.join(&package);
    if let Some(vmlinuz) = find_vmlinuz(&unpacked) {
        return Ok(Kernel { package, vmlinuz });
    }
    let deb = match find_deb(&cache, &package) {
        Some(deb) => deb,
        None => {
            eprintln!("xtask: downloading {package}");
            let download = |cache: &Path| {
                run(Command::new("apt-get")
                    .current_dir(cache)
                    .args(["download", "-q", &package]))
            };
            if download(&cache).is_err() {
                // Stale lists name versions the mirror no longer has.
                run(Command::new("apt-get").args(["update", "-q"]))
                    .context("`apt-get update` failed")?;
                download(&cache).with_context(|| {
                    format!(
                        "`apt-get download {package}` failed; check access to the Debian mirror"
                    )
                })?;
            }
            find_deb(&cache, &package)
                .with_context(|| format!("apt-get download left no {package}_*.deb"))?
        }
    };
    let partial = cache.join(format!("{package}.partial"));
    let _ = fs::remove_dir_all(&partial);
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&partial))
        .with_context(|| format!("unpacking {}", deb.display()))?;
    fs::rename(&partial, &unpacked)?;
    let vmlinuz = find_vmlinuz(&unpacked)
        .with_context(|| format!("{} holds no boot/vmlinuz-*", deb.display()))?;
    Ok(Kernel { package, vmlinuz })
}

/// The kernel versions a name like `6.1` or `6.1.0-56` stands for, newest first.
fn matching_packages<'a>(names: impl Iterator<Item = &'a str>, version: &str) -> Vec<String> {
    let mut found: Vec<String> = names
        .filter_map(|name| {
            let v = name
                .strip_prefix("linux-image-")?
                .strip_suffix("-cloud-amd64")?;
            let matches = v == version
                || v.strip_prefix(version)
                    .is_some_and(|rest| rest.starts_with(['.', '-', '+']));
            // Meta packages (`linux-image-6.12-cloud-amd64`) hold no kernel.
            let concrete = v.contains('-') || v.contains('+');
            (matches && concrete).then(|| name.to_owned())
        })
        .collect();
    found.sort_by_key(|name| std::cmp::Reverse(version_key(name)));
    found
}

/// Orders `6.1.0-9` before `6.1.0-56`: digit runs compare as numbers.
fn version_key(name: &str) -> Vec<(u64, String)> {
    let mut key = Vec::new();
    let mut rest = name;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits > 0 {
            key.push((rest[..digits].parse().unwrap_or(u64::MAX), String::new()));
            rest = &rest[digits..];
        } else {
            let text = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            key.push((0, rest[..text].to_owned()));
            rest = &rest[text..];
        }
    }
    key
}

fn resolve_package(version: &str) -> anyhow::Result<Option<String>> {
    let out = Command::new("apt-cache")
        .args(["pkgnames", "linux-image-"])
        .output()
        .context("running apt-cache")?;
    let names = String::from_utf8_lossy(&out.stdout);
    Ok(matching_packages(names.lines(), version).into_iter().next())
}

fn cached_package(cache: &Path, version: &str) -> anyhow::Result<Option<String>> {
    let names: Vec<String> = fs::read_dir(cache)?
        .filter_map(|e| e.ok())
        .filter(|e| find_vmlinuz(&e.path()).is_some())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    Ok(matching_packages(names.iter().map(String::as_str), version)
        .into_iter()
        .next())
}

fn find_deb(cache: &Path, package: &str) -> Option<PathBuf> {
    let prefix = format!("{package}_");
    fs::read_dir(cache)
        .ok()?
        .filter_map(|e| e.ok())
        .find_map(|e| {
            let name = e.file_name().into_string().ok()?;
            (name.starts_with(&prefix) && name.ends_with(".deb")).then(|| e.path())
        })
}

fn find_vmlinuz(unpacked: &Path) -> Option<PathBuf> {
    fs::read_dir(unpacked.join("boot"))
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
}

/// Builds the enforcer and the test executables and packs them, with everything they run,
/// into `target/vm/initramfs.cpio`.
fn build_initramfs(vm_dir: &Path, kernels: &[Kernel]) -> anyhow::Result<PathBuf> {
    setup::build_ebpf()?;
    let enforcer = build_enforcer(false)?;
    let suites = build_suites()?;

    let root = vm_dir.join("initramfs");
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    let mut tree = Tree::new(&root)?;
    tree.copy_elf(Path::new("/bin/busybox"), Path::new("/usr/bin/busybox"))?;
    tree.copy_elf(&enforcer, Path::new(GUEST_ENFORCER))?;
    for (name, path) in &suites {
        tree.copy_elf(path, &Path::new(GUEST_DIR).join(name))?;
    }
    for command in GUEST_COMMANDS {
        let path = which(command)?;
        tree.add_host_path(&path)?;
    }
    for module in python_modules()? {
        tree.add_host_path(&module)?;
    }
    for kernel in kernels {
        add_diag_modules(&tree, kernel, vm_dir)?;
    }
    // Last, so that the real commands the suites need win over busybox's smaller ones.
    tree.busybox_applets()?;
    tree.copy_file(
        &workspace_root().join("tests/probe.py"),
        &Path::new(GUEST_DIR).join("probe.py"),
        0o644,
    )?;
    tree.write("/etc/passwd", PASSWD, 0o644)?;
    tree.write("/etc/group", GROUP, 0o644)?;
    tree.write("/etc/nsswitch.conf", NSSWITCH, 0o644)?;
    tree.write("/etc/hosts", HOSTS, 0o644)?;
    tree.write("/init", &init_script(&suites), 0o755)?;
    for dir in ["proc", "sys", "dev", "run", "root"] {
        tree.dir(Path::new("/").join(dir).as_path())?;
    }
    tree.dir(Path::new("/tmp"))?;
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777))?;

    let cpio = vm_dir.join("initramfs.cpio");
    let list = Command::new("find")
        .current_dir(&root)
        .args([".", "-mindepth", "1"])
        .output()
        .context("listing the initramfs tree")?;
    let mut pack = Command::new("cpio")
        .current_dir(&root)
        .args(["-o", "-H", "newc", "--quiet", "-R", "0:0"])
        .stdin(Stdio::piped())
        .stdout(fs::File::create(&cpio)?)
        .spawn()
        .context("running cpio")?;
    pack.stdin
        .take()
        .context("cpio stdin")?
        .write_all(&list.stdout)?;
    if !pack.wait()?.success() {
        bail!("cpio failed to pack {}", root.display());
    }
    eprintln!(
        "xtask: initramfs {} ({} MiB)",
        cpio.display(),
        fs::metadata(&cpio)?.len() >> 20
    );
    Ok(cpio)
}

/// The modules that answer `sock_diag` for TCP (the gateways ask it which cgroup a
/// connection comes from). A distribution kernel builds them as modules and loads them on
/// demand through modprobe, which the guest does not have; `/init` loads them with
/// insmod. Kernels that build them in have none to copy.
const DIAG_MODULES: [&str; 2] = ["inet_diag", "tcp_diag"];

fn add_diag_modules(tree: &Tree, kernel: &Kernel, vm_dir: &Path) -> anyhow::Result<()> {
    let Some(unpacked) = kernel.vmlinuz.parent().and_then(Path::parent) else {
        return Ok(());
    };
    let Ok(versions) = fs::read_dir(unpacked.join("lib/modules")) else {
        return Ok(());
    };
    for version in versions.flatten() {
        let dir = version.path().join("kernel/net/ipv4");
        let version = version.file_name();
        for module in DIAG_MODULES {
            let guest = Path::new("/lib/modules")
                .join(&version)
                .join(format!("{module}.ko"));
            let plain = dir.join(format!("{module}.ko"));
            if plain.is_file() {
                tree.copy_file(&plain, &guest, 0o644)?;
                continue;
            }
            for (ext, tool) in [("xz", "xz"), ("zst", "zstd")] {
                let packed = dir.join(format!("{module}.ko.{ext}"));
                if !packed.is_file() {
                    continue;
                }
                let out = Command::new(tool)
                    .arg("-dc")
                    .arg(&packed)
                    .output()
                    .with_context(|| format!("running {tool} to unpack {}", packed.display()))?;
                if !out.status.success() {
                    bail!("{tool} could not unpack {}", packed.display());
                }
                let scratch = vm_dir.join(format!("{module}.ko"));
                fs::write(&scratch, &out.stdout)?;
                tree.copy_file(&scratch, &guest, 0o644)?;
            }
        }
    }
    Ok(())
}

/// Builds the test executables exactly as `cargo test --workspace` does (so nothing is
/// rebuilt after the host suites) and returns the privileged suites' paths.
fn build_suites() -> anyhow::Result<Vec<(String, PathBuf)>> {
    let out = Command::new("cargo")
        .current_dir(workspace_root())
        .args(["test", "--workspace", "--no-run", "--message-format=json"])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the test executables failed");
    }
    let mut suites = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let target = &message["target"];
        let is_suite = message["reason"] == "compiler-artifact"
            && message["package_id"]
                .as_str()
                .is_some_and(|id| id.contains("enforcer-tests") || id.contains("/tests#"))
            && target["kind"][0] == "test";
        let (Some(name), Some(path)) = (target["name"].as_str(), message["executable"].as_str())
        else {
            continue;
        };
        if is_suite && SUITES.contains(&name) {
            suites.push((name.to_owned(), PathBuf::from(path)));
        }
    }
    suites.sort_by_key(|(name, _)| SUITES.iter().position(|s| s == name));
    for suite in SUITES {
        if !suites.iter().any(|(name, _)| name == suite) {
            bail!("cargo built no test executable named {suite}");
        }
    }
    Ok(suites)
}

fn which(command: &str) -> anyhow::Result<PathBuf> {
    if command.starts_with('/') {
        return Ok(PathBuf::from(command));
    }
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {command}")])
        .output()?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || path.is_empty() {
        bail!("{command} is not installed");
    }
    Ok(PathBuf::from(path))
}

/// Has the host's python run the probe script's code paths and print the file of every
/// module it loaded, plus OpenSSL's configuration. Running them, not just importing the
/// script, matters: `probe_http` imports ssl and urllib only when called, and urllib pulls
/// in http.client and the email parser only when a request is made and a response (or an
/// HTTP error) comes back; the system-call probes load ctypes. The requests go through a
/// one-shot proxy on loopback, as the agent's go through the gateway. Name resolution is
/// done the way
/// `socket.create_connection` does it, which loads the idna codec. The encodings package is
/// added whole: python picks one at start-up by locale.
const PYTHON_MODULES_SCRIPT: &str = r#"
import encodings, os, runpy, socket, ssl, sys, sysconfig, threading

probe = runpy.run_path(sys.argv[1], run_name="probe")
socket.getaddrinfo("127.0.0.1", 1)
# The probes of calls python has no wrapper for (ptrace, pidfd_getfd, io_uring) use ctypes.
import ctypes
ctypes.CDLL(None, use_errno=True)
# Without SSL_CERT_FILE the probe builds the context from the default verify paths.
os.environ.pop("SSL_CERT_FILE", None)
ssl.create_default_context()

answers = [
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n",
]
proxy = socket.socket()
proxy.bind(("127.0.0.1", 0))
proxy.listen(len(answers))

def serve():
    for answer in answers:
        conn, _ = proxy.accept()
        conn.recv(65536)
        conn.sendall(answer)
        conn.close()

server = threading.Thread(target=serve, daemon=True)
server.start()
url = "http://127.0.0.1:%d" % proxy.getsockname()[1]
os.environ.update(HTTP_PROXY=url, HTTPS_PROXY=url, NO_PROXY="")
probe["probe_http"]("ok", "GET", "http://upstream.test/api", "")
probe["probe_http"]("http-error", "POST", "http://upstream.test/api", "{}")
probe["probe_http"]("tunnel-refused", "GET", "https://upstream.test/api", "")
server.join(10)
proxy.close()
probe["probe_http"]("refused", "GET", "http://upstream.test/api", "")

files = {getattr(m, "__file__", None) for m in list(sys.modules.values())}
enc = os.path.dirname(encodings.__file__)
files.update(os.path.join(enc, f) for f in os.listdir(enc) if f.endswith(".py"))
files.add(os.path.join(sysconfig.get_paths()["stdlib"], "os.py"))
for f in sorted(f for f in files if f):
    print("file:", f)
# OpenSSL reads its configuration (security level, providers) from its own directory;
# without it TLS in the guest would not behave as on the host.
cnf = os.path.join(os.path.dirname(ssl.get_default_verify_paths().openssl_cafile), "openssl.cnf")
if os.path.exists(cnf):
    print("file:", cnf)
"#;

/// The files of every module python loads to run the probe script (see
/// `PYTHON_MODULES_SCRIPT`). Extension modules among them are ELF files: the tree adds the
/// shared libraries they load (libssl, libcrypto) as it does for executables.
fn python_modules() -> anyhow::Result<Vec<PathBuf>> {
    let probe = workspace_root().join("tests/probe.py");
    let out = Command::new("/usr/bin/python3")
        .args(["-c", PYTHON_MODULES_SCRIPT])
        .arg(&probe)
        // Proxy settings of the host must not send the probe's requests elsewhere.
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("no_proxy")
        .env_remove("all_proxy")
        .env_remove("ALL_PROXY")
        .output()
        .context("running python3")?;
    if !out.status.success() {
        bail!(
            "listing the probe's python modules failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The requests must have gone as planned (a response, an HTTP error, two failures), or
    // modules the guest needs would be missing from the list.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let results: Vec<(String, bool, String)> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            Some((
                v["probe"].as_str()?.to_owned(),
                v["ok"].as_bool()?,
                v["detail"].as_str()?.to_owned(),
            ))
        })
        .collect();
    let expected = [
        ("ok", true, Some("200")),
        ("http-error", false, Some("403")),
        ("tunnel-refused", false, None),
        ("refused", false, None),
    ];
    let as_planned = results.len() == expected.len()
        && results
            .iter()
            .zip(expected)
            .all(|((name, ok, detail), want)| {
                name == want.0 && *ok == want.1 && want.2.is_none_or(|d| d == detail)
            });
    if !as_planned {
        bail!("the probe's HTTP requests on the host did not go as planned: {results:?}");
    }
    let mut files = Vec::new();
    for line in stdout.lines() {
        let Some(path) = line.strip_prefix("file: ") else {
            continue;
        };
        let path = PathBuf::from(path);
        if path == probe || !path.is_file() {
            continue;
        }
        // Compiled bytecode spares the slow guest from compiling every module at start-up.
        if let (Some(dir), Some(stem)) = (path.parent(), path.file_stem())
            && path.extension().is_some_and(|e| e == "py")
        {
            let cache = dir.join("__pycache__");
            if let Ok(entries) = fs::read_dir(&cache) {
                let prefix = format!("{}.", stem.to_string_lossy());
                for entry in entries.filter_map(|e| e.ok()) {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name.starts_with(&prefix)
                        && name.ends_with(".pyc")
                        && !name.contains(".opt-")
                    {
                        files.push(entry.path());
                    }
                }
            }
        }
        files.push(path);
    }
    Ok(files)
}

/// The staging tree of the initramfs. Host paths keep their place, with the host's
/// merged-/usr symlinks mirrored, so the dynamic loader and python find their files where
/// they were built to look.
struct Tree {
    root: PathBuf,
    seen: BTreeSet<PathBuf>,
    strip: bool,
}

impl Tree {
    fn new(root: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(root)?;
        for top in ["bin", "sbin", "lib", "lib64"] {
            let host = Path::new("/").join(top);
            match fs::read_link(&host) {
                Ok(target) => symlink(&target, root.join(top))?,
                Err(_) => fs::create_dir_all(root.join(top))?,
            }
        }
        Ok(Tree {
            root: root.to_owned(),
            seen: BTreeSet::new(),
            strip: setup::command_exists("strip"),
        })
    }

    fn staged(&self, guest: &Path) -> PathBuf {
        self.root.join(guest.strip_prefix("/").unwrap_or(guest))
    }

    fn dir(&self, guest: &Path) -> anyhow::Result<()> {
        let dir = self.staged(guest);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))
    }

    fn write(&self, guest: &str, contents: &str, mode: u32) -> anyhow::Result<()> {
        let path = self.staged(Path::new(guest));
        self.dir(Path::new(guest).parent().unwrap_or(Path::new("/")))?;
        fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
        Ok(())
    }

    fn copy_file(&self, host: &Path, guest: &Path, mode: u32) -> anyhow::Result<()> {
        let dest = self.staged(guest);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        let copying = || format!("copying {} to {}", host.display(), dest.display());
        let mut source = fs::File::open(host).with_context(copying)?;
        let mut copy = fs::File::create(&dest).with_context(copying)?;
        std::io::copy(&mut source, &mut copy).with_context(copying)?;
        // Python trusts a module's cached bytecode only while the source keeps the mtime
        // recorded in it; a fresh mtime would make every guest python, which as `nobody`
        // cannot write the cache back, recompile ssl, urllib and the rest at each start
        // (seconds under TCG, enough to outlast a short-lived Envelope).
        copy.set_modified(source.metadata()?.modified()?)
            .with_context(|| format!("setting the mtime of {}", dest.display()))?;
        fs::set_permissions(&dest, fs::Permissions::from_mode(mode))?;
        Ok(())
    }

    /// Copies an executable or library without its debug info (it would triple the image)
    /// and adds the shared libraries it loads.
    fn copy_elf(&mut self, host: &Path, guest: &Path) -> anyhow::Result<()> {
        let dest = self.staged(guest);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        let stripped = self.strip
            && Command::new("strip")
                .arg("--strip-debug")
                .arg("-o")
                .arg(&dest)
                .arg(host)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        if !stripped {
            fs::copy(host, &dest)
                .with_context(|| format!("copying {} to {}", host.display(), dest.display()))?;
        }
        let mode = fs::metadata(host)?.permissions().mode() & 0o7777;
        fs::set_permissions(&dest, fs::Permissions::from_mode(mode))?;
        for library in shared_libraries(host)? {
            self.add_host_path(&library)?;
        }
        Ok(())
    }

    /// Adds a host file at the same path, following symlinks (each kept as a symlink) to
    /// the real file.
    fn add_host_path(&mut self, path: &Path) -> anyhow::Result<()> {
        let mut path = path.to_owned();
        for _ in 0..16 {
            let parent = path.parent().context("path without parent")?;
            let parent = fs::canonicalize(parent)
                .with_context(|| format!("resolving {}", parent.display()))?;
            let name = path.file_name().context("path without file name")?;
            let host = parent.join(name);
            if !self.seen.insert(host.clone()) {
                return Ok(());
            }
            let meta = fs::symlink_metadata(&host)
                .with_context(|| format!("reading {}", host.display()))?;
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&host)?;
                let dest = self.staged(&host);
                fs::create_dir_all(dest.parent().context("no parent")?)?;
                symlink(&target, &dest).with_context(|| format!("linking {}", dest.display()))?;
                path = parent.join(target);
                continue;
            }
            if is_elf(&host)? {
                return self.copy_elf(&host, &host);
            }
            return self.copy_file(&host, &host, meta.permissions().mode() & 0o7777);
        }
        bail!("too many symlinks resolving {}", path.display())
    }

    /// Links every busybox applet whose name no real command in the tree already takes.
    fn busybox_applets(&self) -> anyhow::Result<()> {
        let out = Command::new("/bin/busybox")
            .arg("--list-full")
            .output()
            .context("running busybox --list-full")?;
        for applet in String::from_utf8_lossy(&out.stdout).lines() {
            // Under merged /usr, bin/x and usr/bin/x are the same file.
            let guest = Path::new("/usr").join(applet.trim_start_matches("usr/"));
            let dest = self.staged(&guest);
            if fs::symlink_metadata(&dest).is_ok() {
                continue;
            }
            fs::create_dir_all(dest.parent().context("no parent")?)?;
            symlink("/usr/bin/busybox", &dest)?;
        }
        Ok(())
    }
}

fn is_elf(path: &Path) -> anyhow::Result<bool> {
    let mut magic = [0u8; 4];
    let mut file = fs::File::open(path)?;
    Ok(std::io::Read::read(&mut file, &mut magic)? == 4 && &magic == b"\x7fELF")
}

/// The shared libraries `ldd` says `path` loads, the dynamic loader included.
fn shared_libraries(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(path)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let candidate = match line.split_once("=>") {
                Some((_, right)) => right.trim(),
                None => line,
            };
            let file = candidate.split_whitespace().next()?;
            file.starts_with('/').then(|| PathBuf::from(file))
        })
        .collect())
}

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                      nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
const GROUP: &str = "root:x:0:\nnogroup:x:65534:\n";
const NSSWITCH: &str = "passwd: files\ngroup: files\nshadow: files\nhosts: files\n";
const HOSTS: &str = "127.0.0.1 localhost\n::1 localhost\n";

/// `/init`: the mounts a host gives the enforcer, then every suite with one test thread
/// (the suites share the guest's only cgroup tree), then exactly one verdict line.
fn init_script(suites: &[(String, PathBuf)]) -> String {
    let names: Vec<&str> = suites.iter().map(|(name, _)| name.as_str()).collect();
    format!(
        r#"#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
verdict() {{
    echo "$1"
    sync
    poweroff -f
    echo o > /proc/sysrq-trigger
    sleep 60
}}
need() {{
    "$@" || verdict "{FAILURE}: '$*' failed on $(uname -r)"
}}
need mount -t proc proc /proc
need mount -t sysfs sysfs /sys
need mount -t devtmpfs devtmpfs /dev
need mount -t tmpfs -o mode=0755 tmpfs /run
need mkdir -p /sys/fs/cgroup /sys/fs/bpf /run/netns
need mount -t cgroup2 cgroup2 /sys/fs/cgroup
need mount -t bpf -o mode=0700 bpf /sys/fs/bpf
need mount -t securityfs securityfs /sys/kernel/security
echo "{INIT_STARTED} on $(uname -r), lsm=$(cat /sys/kernel/security/lsm)"
need ip link set lo up
for module in {diag_modules}; do
    file=/lib/modules/$(uname -r)/$module.ko
    [ -f "$file" ] && need insmod "$file"
done
export CI=true RUST_BACKTRACE=1 ENFORCER_BIN={GUEST_ENFORCER} ENFORCER_PROBE={GUEST_DIR}/probe.py
# From the kernel command line: larger under emulation than under KVM.
export ENFORCER_TEST_TIME_SCALE="${{ENFORCER_TEST_TIME_SCALE:-1}}"
failed=""
for suite in {suites}; do
    echo "vm-init: running $suite"
    {GUEST_DIR}/$suite --test-threads 1 || failed="$failed $suite"
done
leftover=$(find /sys/fs/bpf -mindepth 1 | head -n 5)
[ -z "$leftover" ] || failed="$failed (left pins behind: $leftover)"
if [ -z "$failed" ]; then
    verdict "{SUCCESS}"
else
    verdict "{FAILURE}:$failed on $(uname -r)"
fi
"#,
        suites = names.join(" "),
        diag_modules = DIAG_MODULES.join(" "),
    )
}

#[derive(Debug)]
enum Outcome {
    Success,
    Failure(String),
}

/// Boots one kernel and reads its verdict from the serial console, which also goes to
/// `target/vm/<package>.log`.
fn boot(
    kernel: &Kernel,
    initramfs: &Path,
    args: &Args,
    accel: &mut Accel,
    vm_dir: &Path,
) -> anyhow::Result<Outcome> {
    let log_path = vm_dir.join(format!("{}.log", kernel.package));
    if *accel == Accel::Auto {
        *accel = if kvm_usable() {
            // KVM guests hang on some hosts before printing anything; give it a short trial.
            eprintln!("xtask: trying KVM for {}", kernel.package);
            let trial = Duration::from_secs(30);
            match run_qemu(kernel, initramfs, args, Accel::Kvm, &log_path, Some(trial))? {
                Console::Done(lines) if lines.iter().any(|l| l.contains(INIT_STARTED)) => {
                    *accel = Accel::Kvm;
                    return Ok(judge(&kernel.package, &lines, false));
                }
                // On nested hosts qemu can also abort at once (rejected MSRs).
                Console::Done(lines) | Console::NoInit(lines) => {
                    let why = lines.last().map(String::as_str).unwrap_or("no output");
                    eprintln!("xtask: the KVM guest did not reach /init ({why}); using TCG");
                    Accel::Tcg
                }
                Console::TimedOut(lines) => {
                    return Ok(judge(&kernel.package, &lines, true));
                }
            }
        } else {
            Accel::Tcg
        };
    }
    eprintln!(
        "xtask: booting {} under {} (console: {})",
        kernel.package,
        if *accel == Accel::Kvm { "KVM" } else { "TCG" },
        log_path.display()
    );
    Ok(
        match run_qemu(kernel, initramfs, args, *accel, &log_path, None)? {
            Console::Done(lines) => judge(&kernel.package, &lines, false),
            Console::NoInit(lines) | Console::TimedOut(lines) => {
                judge(&kernel.package, &lines, true)
            }
        },
    )
}

fn kvm_usable() -> bool {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

enum Console {
    /// qemu exited (the guest powered off, or the kernel panicked and rebooted).
    Done(Vec<String>),
    /// `/init` did not start within the trial time.
    NoInit(Vec<String>),
    TimedOut(Vec<String>),
}

fn run_qemu(
    kernel: &Kernel,
    initramfs: &Path,
    args: &Args,
    accel: Accel,
    log_path: &Path,
    init_deadline: Option<Duration>,
) -> anyhow::Result<Console> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-machine", "q35", "-smp", "2", "-m"])
        .arg(args.memory.to_string())
        .args([
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .args(["-monitor", "none"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 oops=panic quiet loglevel=4 rdinit=/init \
             ENFORCER_TEST_TIME_SCALE={}",
            if accel == Accel::Kvm {
                1
            } else {
                TCG_TIME_SCALE
            }
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match accel {
        Accel::Kvm => cmd.args(["-accel", "kvm", "-cpu", "host"]),
        _ => cmd.args(["-accel", "tcg,thread=multi", "-cpu", "max"]),
    };
    let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut log = fs::File::create(log_path)?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let stderr = child.stderr.take().context("qemu stderr")?;
    let prefix = kernel.package.clone();
    let reader = {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n') {
                let Ok(line) = line else { break };
                let line = String::from_utf8_lossy(&line)
                    .trim_end_matches(['\r', '\n'])
                    .to_owned();
                let _ = writeln!(log, "{line}");
                eprintln!("[{prefix}] {line}");
                lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        })
    };
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut text);
        text
    });

    let started = Instant::now();
    let limit = Duration::from_secs(args.timeout);
    let ended = loop {
        if child.try_wait()?.is_some() {
            break None;
        }
        let init_seen = || {
            lines
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .any(|l| l.contains(INIT_STARTED))
        };
        if let Some(deadline) = init_deadline
            && started.elapsed() > deadline
            && !init_seen()
        {
            break Some(false);
        }
        if started.elapsed() > limit {
            break Some(true);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if ended.is_some() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = reader.join();
    let qemu_errors = errors.join().unwrap_or_default();
    let mut lines = std::mem::take(&mut *lines.lock().unwrap_or_else(|e| e.into_inner()));
    lines.extend(
        qemu_errors
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| format!("qemu: {l}")),
    );
    Ok(match ended {
        None => Console::Done(lines),
        Some(false) => Console::NoInit(lines),
        Some(true) => {
            lines.push(format!("(killed after {} s)", args.timeout));
            Console::TimedOut(lines)
        }
    })
}

/// Exactly one verdict line must be on the console; anything else is a failure with the
/// console's tail printed.
fn judge(package: &str, lines: &[String], timed_out: bool) -> Outcome {
    let verdicts: Vec<&String> = lines
        .iter()
        .filter(|l| l.trim() == SUCCESS || l.starts_with(FAILURE))
        .collect();
    let panicked = lines.iter().any(|l| l.contains("Kernel panic"));
    let why = match (verdicts.as_slice(), timed_out, panicked) {
        ([line], false, false) if line.trim() == SUCCESS => return Outcome::Success,
        ([line], false, false) => line
            .trim_start_matches(FAILURE)
            .trim_start_matches(':')
            .trim()
            .to_owned(),
        (_, _, true) => "the kernel panicked".to_owned(),
        (_, true, _) => "timed out".to_owned(),
        ([], _, _) => "no verdict line on the console".to_owned(),
        _ => format!("{} verdict lines on the console", verdicts.len()),
    };
    let tail = lines.len().saturating_sub(40);
    eprintln!("\nvm-test: {package}: {why}; console tail:");
    for line in &lines[tail..] {
        eprintln!("  | {line}");
    }
    Outcome::Failure(why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_newest_concrete_package_of_a_series() {
        let names = [
            "linux-image-cloud-amd64",
            "linux-image-6.1.0-9-cloud-amd64",
            "linux-image-6.1.0-56-cloud-amd64",
            "linux-image-6.1.0-56-cloud-amd64-dbg",
            "linux-image-6.12-cloud-amd64",
            "linux-image-6.12.9+deb12-cloud-amd64",
            "linux-image-6.12.117+deb12-cloud-amd64",
            "linux-image-6.1.0-56-amd64",
        ];
        let pick = |v| {
            matching_packages(names.iter().copied(), v)
                .into_iter()
                .next()
        };
        assert_eq!(
            pick("6.1").as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        assert_eq!(
            pick("6.1.0-9").as_deref(),
            Some("linux-image-6.1.0-9-cloud-amd64")
        );
        assert_eq!(
            pick("6.12").as_deref(),
            Some("linux-image-6.12.117+deb12-cloud-amd64")
        );
        assert_eq!(pick("5.10"), None);
    }

    #[test]
    fn one_verdict_line_decides() {
        let lines = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(matches!(
            judge("k", &lines(&["boot", "vm-test: success"]), false),
            Outcome::Success
        ));
        assert!(matches!(
            judge("k", &lines(&["vm-test: failure: escape on 6.1"]), false),
            Outcome::Failure(_)
        ));
        assert!(matches!(
            judge("k", &lines(&["boot"]), false),
            Outcome::Failure(_)
        ));
        assert!(matches!(
            judge(
                "k",
                &lines(&["vm-test: success", "Kernel panic - not syncing"]),
                false
            ),
            Outcome::Failure(_)
        ));
        assert!(matches!(
            judge("k", &lines(&["vm-test: success"]), true),
            Outcome::Failure(_)
        ));
    }
}
