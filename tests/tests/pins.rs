//! Pinned state across enforcer processes: adoption without re-attaching, stale pins
//! refused, unload leaves nothing behind.
mod common;

use common::{Instance, Server, args, privileged};

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
    assert_eq!(first.as_object().map(|o| o.len()), Some(6), "{first}");
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
