//! Where agents live: their cgroup v2 directory below the enforcer's parent cgroup, and the
//! confined process started inside it as an unprivileged user.
use std::{
    ffi::OsString,
    fs::{self, OpenOptions},
    io::{self, Write},
    os::{
        fd::AsRawFd,
        unix::{fs::MetadataExt, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

mod identity;
pub mod landlock;
mod seccomp;

pub use identity::{AGENT_UIDS, AgentHome, UidLease, lease_agent_uid};
pub use seccomp::AgentFilter;

/// The enforcer's parent cgroup, relative to the cgroup v2 mount, unless told otherwise.
pub const DEFAULT_CGROUP_PARENT: &str = "enforcer";

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(
        "no cgroup v2 filesystem is mounted (looked for fstype cgroup2 in /proc/self/mountinfo); \
         mount one with `mount -t cgroup2 none /sys/fs/cgroup` or boot with a cgroup v2 hierarchy"
    )]
    NoCgroup2,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "invalid agent name {0:?}: use 1 to 64 characters of A-Z, a-z, 0-9, '-' and '_', \
         not starting with '-'"
    )]
    BadName(String),
    #[error("invalid cgroup parent {0:?}: give a relative path without '..' components")]
    BadParent(String),
    #[error(
        "agent cgroup {0} already exists; another agent of that name is running, or it was \
         left behind: stop it with `enforcer unload --force` or pick another --name"
    )]
    AgentExists(PathBuf),
    #[error("no agent named {name} (no cgroup {path})")]
    NoSuchAgent { name: String, path: PathBuf },
    #[error("unknown user {0:?}: create it, or pass --user with an existing unprivileged user")]
    UnknownUser(String),
    #[error(
        "refusing to run the agent as root (uid 0 or primary group 0): pass --user with an unprivileged user, or leave it out"
    )]
    RootAgent,
    #[error(
        "no free agent uid in {first}..={last}: every one is in use by a process or named by an account"
    )]
    NoFreeUid { first: u32, last: u32 },
    #[error(
        "standard {0} is a network socket, which the agent would inherit past the kernel programs; \
         give it a pipe, a file or a terminal"
    )]
    NetworkStdio(&'static str),
    #[error("agent processes in {path} did not exit within {seconds}s")]
    StillRunning { path: PathBuf, seconds: u64 },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> SandboxError {
    let context = context.into();
    move |source| SandboxError::Io { context, source }
}

/// The cgroup v2 mount point, read from `/proc/self/mountinfo`: `/sys/fs/cgroup` on most
/// hosts, `/sys/fs/cgroup/unified` on hybrid ones.
pub fn cgroup2_mount() -> Result<PathBuf, SandboxError> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_err("reading /proc/self/mountinfo"))?;
    find_cgroup2_mount(&mountinfo).ok_or(SandboxError::NoCgroup2)
}

fn find_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // Fields: id parent major:minor root mount-point options [optional…] - fstype source …
        let (before, after) = line.split_once(" - ")?;
        let fstype = after.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mount_point = before.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value = (bytes[i + 1] - b'0') as u32 * 64
                + (bytes[i + 2] - b'0') as u32 * 8
                + (bytes[i + 3] - b'0') as u32;
            out.push(value as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The directory under which every agent cgroup is created, and to which the kernel
/// programs are attached.
#[derive(Clone, Debug)]
pub struct CgroupParent {
    path: PathBuf,
}

impl CgroupParent {
    /// Resolves `relative` (e.g. `enforcer`) against the cgroup v2 mount, creating it.
    pub fn create(relative: &str) -> Result<Self, SandboxError> {
        let path = Self::locate(relative)?;
        fs::create_dir_all(&path).map_err(io_err(format!("creating cgroup {}", path.display())))?;
        Ok(Self { path })
    }

    /// Resolves `relative` against the cgroup v2 mount without creating anything.
    pub fn locate(relative: &str) -> Result<PathBuf, SandboxError> {
        let rel = Path::new(relative);
        if relative.is_empty()
            || rel.is_absolute()
            || rel
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(SandboxError::BadParent(relative.to_owned()));
        }
        Ok(cgroup2_mount()?.join(rel))
    }

    pub fn open(relative: &str) -> Result<Self, SandboxError> {
        let path = Self::locate(relative)?;
        if !path.is_dir() {
            return Err(SandboxError::Io {
                context: format!("cgroup parent {}", path.display()),
                source: io::Error::from(io::ErrorKind::NotFound),
            });
        }
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The agent cgroups below this parent, by name.
    pub fn agents(&self) -> Result<Vec<AgentCgroup>, SandboxError> {
        let mut agents = Vec::new();
        let entries =
            fs::read_dir(&self.path).map_err(io_err(format!("reading {}", self.path.display())))?;
        for entry in entries {
            let entry = entry.map_err(io_err(format!("reading {}", self.path.display())))?;
            let meta = entry
                .metadata()
                .map_err(io_err(format!("reading {}", entry.path().display())))?;
            if meta.is_dir() {
                agents.push(AgentCgroup {
                    name: entry.file_name().to_string_lossy().into_owned(),
                    path: entry.path(),
                    id: meta.ino(),
                });
            }
        }
        agents.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(agents)
    }

    pub fn agent(&self, name: &str) -> Result<AgentCgroup, SandboxError> {
        validate_agent_name(name)?;
        let path = self.path.join(name);
        let meta = fs::metadata(&path).map_err(|_| SandboxError::NoSuchAgent {
            name: name.to_owned(),
            path: path.clone(),
        })?;
        Ok(AgentCgroup {
            name: name.to_owned(),
            path,
            id: meta.ino(),
        })
    }

    /// Creates a new, empty agent cgroup. It must not exist yet: reusing one could inherit
    /// processes or a policy entry of another agent.
    pub fn create_agent(&self, name: &str) -> Result<AgentCgroup, SandboxError> {
        validate_agent_name(name)?;
        let path = self.path.join(name);
        match fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(SandboxError::AgentExists(path));
            }
            Err(e) => return Err(io_err(format!("creating cgroup {}", path.display()))(e)),
        }
        let id = fs::metadata(&path)
            .map_err(io_err(format!("reading {}", path.display())))?
            .ino();
        Ok(AgentCgroup {
            name: name.to_owned(),
            path,
            id,
        })
    }

    /// Removes the parent if no agent cgroup is left in it.
    pub fn remove_if_empty(&self) -> Result<(), SandboxError> {
        match fs::remove_dir(&self.path) {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOTEMPTY) | Some(libc::EBUSY) | Some(libc::ENOENT)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(io_err(format!("removing {}", self.path.display()))(e)),
        }
    }
}

pub fn validate_agent_name(name: &str) -> Result<(), SandboxError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(SandboxError::BadName(name.to_owned()))
    }
}

/// Marks every descriptor from 3 to `highest` close-on-exec, one call each. Only makes
/// system calls, so it may run between fork and exec.
fn cloexec_each_above_stdio(highest: i32) -> io::Result<()> {
    for fd in 3..=highest {
        // SAFETY: fcntl(2) on a descriptor number; one that is not open fails with EBADF.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags >= 0 && unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The highest descriptor number this process has open, for kernels without
/// `CLOSE_RANGE_CLOEXEC` (the fork copies no others).
fn highest_open_fd() -> Result<i32, SandboxError> {
    let entries = fs::read_dir("/proc/self/fd").map_err(io_err("reading /proc/self/fd"))?;
    let mut highest = 2;
    for entry in entries {
        let entry = entry.map_err(io_err("reading /proc/self/fd"))?;
        if let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() {
            highest = highest.max(fd);
        }
    }
    Ok(highest)
}

/// A network socket as stdin, stdout or stderr (a command started by inetd, or with its
/// output sent to a socket) would reach the agent opened outside its cgroup, where no
/// kernel program judges it.
fn refuse_network_stdio() -> Result<(), SandboxError> {
    for (fd, name) in [(0, "input"), (1, "output"), (2, "error")] {
        let mut domain: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt(2) writes at most `len` bytes into `domain`; on a descriptor
        // that is not a socket (or not open) it fails with ENOTSOCK / EBADF.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_DOMAIN,
                (&mut domain as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc == 0 && domain != libc::AF_UNIX {
            return Err(SandboxError::NetworkStdio(name));
        }
    }
    Ok(())
}

/// The environment an agent starts with: nothing of the caller's (an operator's shell
/// holds tokens), only what a program needs to run, then `extra`.
pub fn agent_env(home: &Path, extra: &[(String, String)]) -> Vec<(String, String)> {
    let mut env = vec![
        (
            "PATH".to_owned(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
        ),
        ("HOME".to_owned(), home.display().to_string()),
        ("TMPDIR".to_owned(), home.display().to_string()),
        ("LANG".to_owned(), "C.UTF-8".to_owned()),
    ];
    if let Ok(term) = std::env::var("TERM") {
        env.push(("TERM".to_owned(), term));
    }
    for (key, value) in extra {
        env.retain(|(k, _)| k != key);
        env.push((key.clone(), value.clone()));
    }
    env
}

/// One agent's cgroup. Its inode number is the cgroup id the kernel programs see.
#[derive(Clone, Debug)]
pub struct AgentCgroup {
    pub name: String,
    pub path: PathBuf,
    pub id: u64,
}

/// The unprivileged identity an agent runs as.
#[derive(Clone, Debug)]
pub struct AgentUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl AgentUser {
    pub fn lookup(name: &str) -> Result<Self, SandboxError> {
        let user = nix::unistd::User::from_name(name)
            .map_err(|e| io_err(format!("looking up user {name}"))(e.into()))?
            .ok_or_else(|| SandboxError::UnknownUser(name.to_owned()))?;
        // Group 0 owns files root means to share with no one else.
        if user.uid.is_root() || user.gid.as_raw() == 0 {
            return Err(SandboxError::RootAgent);
        }
        Ok(Self {
            name: name.to_owned(),
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        })
    }
}

impl AgentCgroup {
    /// The agent cgroup at `path` (as the daemon reports it).
    pub fn at(path: PathBuf, name: String) -> Result<Self, SandboxError> {
        let id = fs::metadata(&path)
            .map_err(|_| SandboxError::NoSuchAgent {
                name: name.clone(),
                path: path.clone(),
            })?
            .ino();
        Ok(AgentCgroup { name, path, id })
    }

    /// PIDs of every process in the cgroup.
    pub fn pids(&self) -> Result<Vec<u32>, SandboxError> {
        let procs = self.path.join("cgroup.procs");
        let text = match fs::read_to_string(&procs) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(format!("reading {}", procs.display()))(e)),
        };
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Starts `program` inside this cgroup as `user`, with exactly the environment `env`.
    ///
    /// Before the agent's first instruction: it is in the cgroup; `no_new_privs` is set,
    /// so neither it nor anything it starts can regain privileges; it leads a session of
    /// its own, so it has no controlling terminal to push input into (`TIOCSTI`) once it
    /// exits; every descriptor but stdio is closed at exec, so no socket opened outside
    /// the cgroup reaches it; its umask is 077; where the kernel has Landlock scopes it can
    /// neither connect to the host's abstract Unix sockets nor signal processes outside
    /// it ([`landlock`]); and [`AgentFilter`] refuses the system calls that reach past the
    /// kernel programs.
    pub fn spawn(
        &self,
        program: &OsString,
        args: &[OsString],
        user: &AgentUser,
        env: &[(String, String)],
    ) -> Result<Child, SandboxError> {
        refuse_network_stdio()?;
        let procs_path = self.path.join("cgroup.procs");
        let procs = OpenOptions::new()
            .write(true)
            .open(&procs_path)
            .map_err(io_err(format!("opening {}", procs_path.display())))?;
        let mut command = Command::new(program);
        command.args(args).env_clear();
        for (key, value) in env {
            command.env(key, value);
        }
        let (uid, gid) = (user.uid, user.gid);
        let procs_fd = procs.as_raw_fd();
        let filter = AgentFilter::new();
        let scope = landlock::Scope::create()
            .map_err(io_err("creating the agent's Landlock scope".to_owned()))?;
        if scope.is_none() {
            tracing::warn!(
                landlock_abi = landlock::abi_version(),
                "this kernel has no Landlock scopes (Linux 6.12): the agent can reach \
                 abstract Unix sockets of the host"
            );
        }
        let scope_fd = scope.as_ref().map(landlock::Scope::raw_fd);
        let highest_fd = highest_open_fd()?;
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls on values copied in, allocating nothing.
        unsafe {
            command.pre_exec(move || {
                // "0" moves the writing process itself; the cgroup is joined before any
                // code of the agent runs, so no instruction of it is ever unconfined.
                let zero = b"0";
                if libc::write(procs_fd, zero.as_ptr().cast(), zero.len()) != zero.len() as isize {
                    return Err(io::Error::last_os_error());
                }
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                // Close-on-exec rather than closed: the standard library still reports a
                // failed exec through a descriptor of its own.
                if libc::syscall(
                    libc::SYS_close_range,
                    3u32,
                    u32::MAX,
                    libc::CLOSE_RANGE_CLOEXEC,
                ) != 0
                {
                    // Before Linux 5.11.
                    cloexec_each_above_stdio(highest_fd)?;
                }
                libc::umask(0o077);
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::setgroups(0, std::ptr::null()) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::setresgid(gid, gid, gid) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::setresuid(uid, uid, uid) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if let Some(fd) = scope_fd {
                    landlock::enforce(fd)?;
                }
                filter.install()
            });
        }
        let child = command.spawn().map_err(io_err(format!(
            "starting {} in {}",
            program.to_string_lossy(),
            self.path.display()
        )))?;
        drop(procs);
        drop(scope);
        Ok(child)
    }

    /// Kills every process in the cgroup and waits until it is empty.
    pub fn kill_all(&self, timeout: Duration) -> Result<(), SandboxError> {
        let kill_file = self.path.join("cgroup.kill");
        let used_cgroup_kill = kill_file.exists()
            && OpenOptions::new()
                .write(true)
                .open(&kill_file)
                .and_then(|mut f| f.write_all(b"1"))
                .is_ok();
        let deadline = Instant::now() + timeout;
        loop {
            let pids = self.pids()?;
            if pids.is_empty() {
                return Ok(());
            }
            if !used_cgroup_kill {
                for pid in &pids {
                    // SAFETY: plain kill(2); a pid that has gone away is ignored.
                    unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
                }
            }
            if Instant::now() >= deadline {
                return Err(SandboxError::StillRunning {
                    path: self.path.clone(),
                    seconds: timeout.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills what is left and removes the cgroup.
    pub fn remove(&self, timeout: Duration) -> Result<(), SandboxError> {
        if !self.path.exists() {
            return Ok(());
        }
        self.kill_all(timeout)?;
        let deadline = Instant::now() + timeout;
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                // The last exited task can linger for a moment after cgroup.procs is empty.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(io_err(format!("removing {}", self.path.display()))(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fallback_marks_every_inherited_descriptor_close_on_exec() {
        // A descriptor as a careless caller leaves it: inheritable.
        let file = std::fs::File::open("/proc/self/status").unwrap();
        let fd = file.as_raw_fd();
        // SAFETY: fcntl(2) on a descriptor this test owns.
        unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
        cloexec_each_above_stdio(highest_open_fd().unwrap()).unwrap();
        // SAFETY: as above.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
    }

    #[test]
    fn finds_cgroup2_on_hybrid_and_unified_hosts() {
        let hybrid = "25 20 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec shared:9 - cgroup2 cgroup2 rw,nsdelegate\n\
                      27 25 0:24 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert_eq!(
            find_cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "30 22 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let none = "30 22 0:26 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert_eq!(find_cgroup2_mount(none), None);
        let escaped = "30 22 0:26 / /mnt/with\\040space rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_cgroup2_mount(escaped),
            Some(PathBuf::from("/mnt/with space"))
        );
        assert_eq!(find_cgroup2_mount("garbage line\n\n - \n"), None);
    }

    #[test]
    fn agent_names_are_plain() {
        for good in ["a", "agent-1", "A_b-9", &"x".repeat(64)] {
            assert!(validate_agent_name(good).is_ok(), "{good}");
        }
        for bad in ["", "-x", "a/b", "..", ".", "a b", "é", &"x".repeat(65)] {
            assert!(validate_agent_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parents_must_stay_below_the_mount() {
        for bad in ["", "/abs", "../up", "a/../b", "./a"] {
            assert!(
                matches!(CgroupParent::locate(bad), Err(SandboxError::BadParent(_))),
                "{bad}"
            );
        }
    }
}
