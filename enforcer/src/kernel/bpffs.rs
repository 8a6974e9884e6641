//! bpffs: the filesystem that keeps pinned maps and links alive without a process.
use std::path::{Path, PathBuf};

use super::KernelError;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

/// Makes sure `pin_dir` lies on a bpffs, mounting one at `/sys/fs/bpf` when nothing is
/// mounted there (many hosts, and this project's CI machine, boot without it).
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), KernelError> {
    let mount_point = bpffs_mount_point(pin_dir);
    if is_bpffs(&mount_point) {
        return Ok(());
    }
    if mount_point != Path::new(DEFAULT_BPFFS) {
        return Err(KernelError::io(
            format!("{} is not on a bpffs", pin_dir.display()),
            std::io::Error::other(format!(
                "mount one there (`mount -t bpf bpf {}`) or use a --pin-dir under {DEFAULT_BPFFS}",
                mount_point.display()
            )),
        ));
    }
    std::fs::create_dir_all(&mount_point)
        .map_err(|e| KernelError::io(format!("creating {}", mount_point.display()), e))?;
    nix::mount::mount(
        Some("bpf"),
        &mount_point,
        Some("bpf"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        Some("mode=0700"),
    )
    .map_err(|e| {
        KernelError::io(
            format!("mounting bpffs at {}", mount_point.display()),
            e.into(),
        )
    })?;
    tracing::info!(path = %mount_point.display(), "mounted bpffs");
    Ok(())
}

/// The directory whose filesystem must be bpffs: the first existing ancestor of `pin_dir`
/// below `/sys/fs/bpf`, or `/sys/fs/bpf` itself.
fn bpffs_mount_point(pin_dir: &Path) -> PathBuf {
    if pin_dir.starts_with(DEFAULT_BPFFS) {
        return PathBuf::from(DEFAULT_BPFFS);
    }
    let mut dir = pin_dir.to_path_buf();
    while !dir.exists() {
        if !dir.pop() {
            break;
        }
    }
    dir
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|fs| fs.filesystem_type().0 == BPF_FS_MAGIC)
}
