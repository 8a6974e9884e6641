//! Replacing the program behind a pinned link in place (`BPF_LINK_UPDATE`), so a new build's
//! programs take over from an older build's without the cgroup ever being unguarded: the
//! link stays attached and the kernel switches programs atomically.
//!
//! aya keeps `BPF_LINK_UPDATE`, program ids → fds and raw object info to itself, so the few
//! calls this needs are made here, like `BPF_PROG_QUERY` in `query.rs`.
use std::{
    ffi::CString,
    io,
    mem::size_of,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
/// `BPF_LINK_UPDATE` only if the link still runs the program given as the old one.
const BPF_F_REPLACE: u32 = 1 << 2;

/// One `bpf(2)` call. The attr structs below are prefixes of `union bpf_attr`; the kernel
/// accepts a shorter attr as long as what it does not see would be zero.
fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialized `#[repr(C)]` struct of the given size for the
    // whole call; the kernel reads it and writes at most the pointers it carries, which the
    // callers keep alive.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn owned_fd(fd: libc::c_long) -> io::Result<OwnedFd> {
    let fd =
        i32::try_from(fd).map_err(|_| io::Error::other("bpf(2) returned an fd out of range"))?;
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens a pinned object (link, map or program) by its bpffs path.
pub fn open_pinned(path: &Path) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let name = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pin path contains NUL"))?;
    let mut attr = ObjGet {
        pathname: name.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    owned_fd(sys_bpf(BPF_OBJ_GET, &mut attr)?)
}

/// `BPF_OBJ_GET_INFO_BY_FD` into the first `size_of::<T>()` bytes of the kernel's info
/// struct; the kernel copies out no more than it is given room for.
fn info<T: Default>(fd: BorrowedFd<'_>) -> io::Result<T> {
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut out = T::default();
    let mut attr = InfoByFd {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<T>() as u32,
        info: &mut out as *mut T as u64,
    };
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(out)
}

/// The head of `struct bpf_link_info`.
#[repr(C)]
#[derive(Default)]
struct LinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
}

/// The head of `struct bpf_prog_info`.
#[repr(C)]
#[derive(Default)]
struct ProgInfo {
    prog_type: u32,
    id: u32,
    tag: [u8; 8],
}

/// The head of `struct bpf_map_info`.
#[repr(C)]
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapLayout {
    pub map_type: u32,
    pub id: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub map_flags: u32,
}

/// The layout of a pinned map as the kernel holds it.
pub fn pinned_map_layout(path: &Path) -> io::Result<MapLayout> {
    let fd = open_pinned(path)?;
    info(fd.as_fd())
}

/// A program as the kernel identifies it: its id, and its tag, a hash of its instructions
/// that is the same for every load of the same program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramIdentity {
    pub id: u32,
    pub prog_type: u32,
    pub tag: [u8; 8],
}

pub fn program_identity(prog: BorrowedFd<'_>) -> io::Result<ProgramIdentity> {
    let i: ProgInfo = info(prog)?;
    Ok(ProgramIdentity {
        id: i.id,
        prog_type: i.prog_type,
        tag: i.tag,
    })
}

/// The link's own id and an fd of the program it runs now.
pub fn link_program(link: BorrowedFd<'_>) -> io::Result<(u32, OwnedFd)> {
    #[repr(C)]
    struct GetFdById {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let l: LinkInfo = info(link)?;
    let mut attr = GetFdById {
        id: l.prog_id,
        next_id: 0,
        open_flags: 0,
    };
    Ok((l.id, owned_fd(sys_bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)?)?))
}

/// Makes `link` run `new` instead of `old`, atomically. Fails with `EPERM` if the link no
/// longer runs `old` (someone else replaced it meanwhile) and with `EINVAL` if `new` is
/// not of the same program type.
pub fn replace_program(
    link: BorrowedFd<'_>,
    new: BorrowedFd<'_>,
    old: BorrowedFd<'_>,
) -> io::Result<()> {
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut attr = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: new.as_raw_fd() as u32,
        flags: BPF_F_REPLACE,
        old_prog_fd: old.as_raw_fd() as u32,
    };
    sys_bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}
