//! A uid of its own for every agent.
//!
//! Processes of one uid can reach into each other: `/proc/PID/mem`, signals, and (where
//! seccomp does not stop it) ptrace. Agents sharing a user could take one another's
//! sockets and grants, and any unconfined process of that user could be made to send for
//! them. So each agent gets a uid (and a gid of the same number) that no account has and
//! no other process runs as, from a range set aside for agents, like systemd's
//! `DynamicUser=`.
use std::{
    collections::HashSet,
    fs::{self, File, OpenOptions},
    io,
    os::{
        fd::AsRawFd,
        unix::fs::{OpenOptionsExt, PermissionsExt},
    },
    path::{Path, PathBuf},
};

use rand::Rng;

use super::{AgentUser, SandboxError, io_err};

/// The agents' uids and gids: the first 65536 of the range systemd leaves unused
/// (1879048192–2147483646; see systemd's UIDS-GIDS.md), above every account, container
/// and DynamicUser range it allocates.
pub const AGENT_UIDS: std::ops::Range<u32> = 1_879_048_192..1_879_048_192 + 65_536;

/// Serializes choosing a uid with starting the process that makes it taken.
const LOCK_PATH: &str = "/run/enforcer-agent-uids.lock";

/// Holds the choice of a uid until the agent runs as it; drop it after the spawn.
#[derive(Debug)]
pub struct UidLease {
    _lock: File,
}

/// Chooses a free agent uid. Free: no process has it as a real, effective, saved or file
/// system uid or gid, and no account or group is named for it. The start of the search is
/// random, so a uid comes back into use rarely and files an earlier agent left behind
/// (in /tmp, say) are seldom met again.
pub fn lease_agent_uid() -> Result<(AgentUser, UidLease), SandboxError> {
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(LOCK_PATH)
        .map_err(io_err(format!("opening {LOCK_PATH}")))?;
    // SAFETY: flock(2) on a descriptor we own; blocks until the other chooser is done.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io_err(format!("locking {LOCK_PATH}"))(
            io::Error::last_os_error(),
        ));
    }
    let taken = ids_in_use()?;
    sweep_stale_homes(&taken);
    let size = AGENT_UIDS.end - AGENT_UIDS.start;
    let start = rand::thread_rng().gen_range(0..size);
    for step in 0..size {
        let uid = AGENT_UIDS.start + (start + step) % size;
        if taken.contains(&uid) || has_account(uid)? {
            continue;
        }
        let user = AgentUser {
            name: format!("uid {uid}"),
            uid,
            gid: uid,
        };
        return Ok((user, UidLease { _lock: lock }));
    }
    Err(SandboxError::NoFreeUid {
        first: AGENT_UIDS.start,
        last: AGENT_UIDS.end - 1,
    })
}

fn has_account(id: u32) -> Result<bool, SandboxError> {
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(id))
        .map_err(|e| io_err(format!("looking up uid {id}"))(e.into()))?;
    let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(id))
        .map_err(|e| io_err(format!("looking up gid {id}"))(e.into()))?;
    Ok(user.is_some() || group.is_some())
}

/// Every uid and gid some process runs with, from `/proc/*/status`.
fn ids_in_use() -> Result<HashSet<u32>, SandboxError> {
    let mut ids = HashSet::new();
    let entries = fs::read_dir("/proc").map_err(io_err("reading /proc"))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        // A process that exits while we look has no ids left to take.
        let Ok(status) = fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        collect_ids(&status, &mut ids);
    }
    Ok(ids)
}

fn collect_ids(status: &str, ids: &mut HashSet<u32>) {
    for line in status.lines() {
        if let Some(rest) = line
            .strip_prefix("Uid:")
            .or_else(|| line.strip_prefix("Gid:"))
        {
            ids.extend(
                rest.split_whitespace()
                    .filter_map(|v| v.parse::<u32>().ok()),
            );
        }
    }
}

const HOME_PREFIX: &str = "enforcer-home-";

/// Removes the homes of agents that are gone but whose `run` or `confine` was killed
/// before it could remove them: owned by an agent uid no process has. Called under the
/// lease lock, so no home of an agent that is starting (its uid not yet running) is
/// taken for stale.
fn sweep_stale_homes(taken: &HashSet<u32>) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(HOME_PREFIX) {
            continue;
        }
        // symlink_metadata: a link someone planted is not followed, and not ours.
        let Ok(meta) = entry.path().symlink_metadata() else {
            continue;
        };
        if meta.is_dir()
            && AGENT_UIDS.contains(&meta.uid())
            && !taken.contains(&meta.uid())
            && let Err(e) = fs::remove_dir_all(entry.path())
        {
            tracing::warn!(path = %entry.path().display(), error = %e, "could not remove a stale agent home");
        }
    }
}

/// A private home for one agent run: a fresh directory only the agent's uid can enter,
/// removed with everything in it when dropped (after the agent's processes are gone).
#[derive(Debug)]
pub struct AgentHome {
    path: PathBuf,
}

impl AgentHome {
    pub fn create(user: &AgentUser) -> Result<Self, SandboxError> {
        let base = std::env::temp_dir();
        for _ in 0..16 {
            let suffix: u64 = rand::thread_rng().r#gen();
            let path = base.join(format!("{HOME_PREFIX}{suffix:016x}"));
            match fs::DirBuilder::new().create(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err(format!("creating {}", path.display()))(e)),
            }
            let home = Self { path };
            // Root made it, so it is ours until handed over: 0700 first, then the owner.
            fs::set_permissions(&home.path, fs::Permissions::from_mode(0o700))
                .map_err(io_err(format!("restricting {}", home.path.display())))?;
            std::os::unix::fs::chown(&home.path, Some(user.uid), Some(user.gid)).map_err(
                io_err(format!("handing {} to the agent", home.path.display())),
            )?;
            return Ok(home);
        }
        Err(io_err(format!(
            "creating a home directory in {}",
            base.display()
        ))(io::Error::from(io::ErrorKind::AlreadyExists)))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for AgentHome {
    fn drop(&mut self) {
        // remove_dir_all does not follow symlinks the agent may have left inside. A home
        // already swept as stale (the agent is gone) is fine.
        if let Err(e) = fs::remove_dir_all(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove the agent's home");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_id_of_a_process_counts_as_taken() {
        let status = "Name:\tpython3\nUid:\t1000\t1001\t1002\t1003\nGid:\t2000\t2001\t2002\t2003\nGroups:\t5\n";
        let mut ids = HashSet::new();
        collect_ids(status, &mut ids);
        let expected: HashSet<u32> = [1000, 1001, 1002, 1003, 2000, 2001, 2002, 2003].into();
        assert_eq!(ids, expected);
    }
}
