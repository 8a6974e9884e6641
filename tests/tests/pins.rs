//! Pinned state across enforcer processes: adoption without re-attaching, stale pins
//! refused, unload leaves nothing behind.
mod common;

use std::os::fd::AsFd;

use common::{Instance, Server, args, privileged};
use enforcer::kernel::swap;
use enforcer_common::names;

fn program_ids(inst: &Instance) -> serde_json::Value {
    let out = inst
        .command()
        .args(["status", "--json"])
        .output()
        .expect("status");
    assert!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    status["programs"].clone()
}

#[test]
fn a_second_enforcer_adopts_the_pinned_programs() {
    if !privileged("a_second_enforcer_adopts_the_pinned_programs") {
        return;
    }
    let inst = Instance::new("adopt");
    let gateway = Server::start("127.0.0.1:0");
    let (status, _) = inst.confine(gateway.addr, &[], &args(&[]));
    assert!(status.success());
    let first = program_ids(&inst);
    assert_eq!(first.as_object().map(|o| o.len()), Some(8), "{first}");
    let (status, probes) = inst.confine(gateway.addr, &[], &args(&["tcp4", "127.0.0.2", "9"]));
    assert!(status.success());
    probes.assert_denied("tcp4 127.0.0.2");
    assert_eq!(
        program_ids(&inst),
        first,
        "the programs were re-attached instead of adopted"
    );
}

#[test]
fn another_builds_program_is_replaced_inside_its_pinned_link() {
    if !privileged("another_builds_program_is_replaced_inside_its_pinned_link") {
        return;
    }
    let inst = Instance::new("swap");
    let gateway = Server::start("127.0.0.1:0");
    let (status, _) = inst.confine(gateway.addr, &[], &args(&[]));
    assert!(status.success());
    let first = program_ids(&inst);
    let link_path = inst.pin_dir.join("links").join(names::PROG_CONNECT4);
    let link_id = |path: &std::path::Path| {
        let link = swap::open_pinned(path).expect("open pinned link");
        swap::link_program(link.as_fd()).expect("link info").0
    };
    let link_before = link_id(&link_path);

    // Stand in for an older build: a connect4 program with other instructions (one that
    // allows every connect) goes behind the connect4 link. Kernels refuse a link update
    // to a program of another attach type, so it has to be a connect4 program.
    let foreign = {
        let new = load_allow_all_connect4();
        let link = swap::open_pinned(&link_path).expect("open pinned link");
        let (_, old) = swap::link_program(link.as_fd()).expect("link program");
        swap::replace_program(link.as_fd(), new.as_fd(), old.as_fd()).expect("link update");
        swap::program_identity(new.as_fd()).expect("identity").id
        // The link keeps the foreign program loaded once `new` is closed.
    };
    let tampered = program_ids(&inst);
    assert_eq!(tampered[names::PROG_CONNECT4], foreign, "{tampered}");

    // The next enforcer process puts this build's program back, inside the same link.
    let (status, probes) = inst.confine(gateway.addr, &[], &args(&["tcp4", "127.0.0.2", "9"]));
    assert!(status.success());
    probes.assert_denied("tcp4 127.0.0.2");
    let after = program_ids(&inst);
    let replaced = &after[names::PROG_CONNECT4];
    assert_ne!(replaced, &serde_json::json!(foreign), "{after}");
    assert_ne!(replaced, &first[names::PROG_CONNECT4], "{after}");
    assert_eq!(
        link_id(&link_path),
        link_before,
        "the link was re-created instead of updated: the cgroup was unguarded in between"
    );
    for (name, id) in first.as_object().expect("programs") {
        if name != names::PROG_CONNECT4 {
            assert_eq!(
                &after[name], id,
                "{name} was replaced although it was unchanged"
            );
        }
    }
}

/// Loads `r0 = 1; exit` as a cgroup connect4 program: the kernel's tag for it differs
/// from any build's, and it lets every connect through.
fn load_allow_all_connect4() -> std::os::fd::OwnedFd {
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
    const BPF_CGROUP_INET4_CONNECT: u32 = 10;
    // mov64 r0, 1 ; exit — each instruction is code, dst/src registers, offset, immediate.
    let insns: [u64; 2] = [
        u64::from_le_bytes([0xb7, 0, 0, 0, 1, 0, 0, 0]),
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
    ];
    let license = c"GPL";
    let mut attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: *b"older_build\0\0\0\0\0",
        prog_ifindex: 0,
        expected_attach_type: BPF_CGROUP_INET4_CONNECT,
    };
    // SAFETY: `attr`, the instructions and the license outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &mut attr as *mut ProgLoad,
            std::mem::size_of::<ProgLoad>() as libc::c_uint,
        )
    };
    assert!(
        fd >= 0,
        "BPF_PROG_LOAD: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the kernel just returned this fd and nothing else owns it.
    unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) }
}

/// Creates a hash map with 8-byte keys and 4-byte values and pins it at `path`.
fn pin_hash_map(path: &std::path::Path) {
    use std::os::{fd::AsRawFd, unix::ffi::OsStrExt};
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
    }
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_HASH: u32 = 1;
    let mut create = MapCreate {
        map_type: BPF_MAP_TYPE_HASH,
        key_size: 8,
        value_size: 4,
        max_entries: 16,
    };
    // SAFETY: `create` is a valid prefix of `union bpf_attr` for the duration of the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &mut create as *mut MapCreate,
            std::mem::size_of::<MapCreate>() as libc::c_uint,
        )
    };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the kernel just returned this fd and nothing else owns it.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    let name = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path");
    let mut pin = ObjPin {
        pathname: name.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    // SAFETY: `pin` and the path it points to outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_PIN,
            &mut pin as *mut ObjPin,
            std::mem::size_of::<ObjPin>() as libc::c_uint,
        )
    };
    assert_eq!(ret, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
}

#[test]
fn maps_pinned_with_another_layout_are_refused_before_anything_is_attached() {
    if !privileged("maps_pinned_with_another_layout_are_refused_before_anything_is_attached") {
        return;
    }
    let inst = Instance::new("layout");
    let maps = inst.pin_dir.join("maps");
    enforcer::kernel::ensure_bpffs(&inst.pin_dir).expect("bpffs");
    std::fs::create_dir_all(&maps).expect("maps dir");
    pin_hash_map(&maps.join(names::POLICY_MAP));
    let gateway = Server::start("127.0.0.1:0");
    let out = inst
        .confine_command(gateway.addr, &[], &args(&[]))
        .output()
        .expect("confine");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an agent ran; stderr: {stderr}");
    assert!(
        stderr.contains("another layout")
            && stderr.contains("value size 4")
            && stderr.contains("enforcer unload --force"),
        "stderr: {stderr}"
    );
    let links = std::fs::read_dir(inst.pin_dir.join("links"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(links, 0, "programs were attached against a foreign map");
}

#[test]
fn pins_of_another_cgroup_parent_are_refused_as_stale() {
    if !privileged("pins_of_another_cgroup_parent_are_refused_as_stale") {
        return;
    }
    let inst = Instance::new("stale");
    let gateway = Server::start("127.0.0.1:0");
    let (status, _) = inst.confine(gateway.addr, &[], &args(&[]));
    assert!(status.success());
    let other_parent = format!("{}-other", inst.cgroup_parent);
    let out = inst
        .command()
        .env("ENFORCER_CGROUP_PARENT", &other_parent)
        .args([
            "confine",
            "--gateway",
            &gateway.addr.to_string(),
            "--",
            "/bin/true",
        ])
        .output()
        .expect("confine");
    let _ = std::fs::remove_dir(
        enforcer::sandbox::CgroupParent::locate(&other_parent).expect("locate"),
    );
    assert!(
        !out.status.success(),
        "an agent ran under pins that do not guard its parent"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("stale pin") && stderr.contains("enforcer unload"),
        "stderr: {stderr}"
    );
}

#[test]
fn unload_removes_pins_and_cgroups() {
    if !privileged("unload_removes_pins_and_cgroups") {
        return;
    }
    let inst = Instance::new("unload");
    let gateway = Server::start("127.0.0.1:0");
    let (status, _) = inst.confine(gateway.addr, &[], &args(&[]));
    assert!(status.success());
    assert!(inst.pin_dir.join("links").exists());
    let out = inst.command().arg("unload").output().expect("unload");
    assert!(
        out.status.success(),
        "unload: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!inst.pin_dir.exists(), "pins left behind");
    assert!(!inst.cgroup_dir().exists(), "cgroup parent left behind");
    let out = inst.command().args(["status"]).output().expect("status");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no enforcer programs are pinned"));
}

#[test]
fn commands_say_plainly_that_they_need_root() {
    // Runs as an unprivileged user, so it needs root to switch users first.
    if !privileged("commands_say_plainly_that_they_need_root") {
        return;
    }
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(common::enforcer_bin())
        .args(["confine", "--gateway", "127.0.0.1:1", "--", "/bin/true"])
        .output()
        .expect("run as nobody");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must run as root"));
}
