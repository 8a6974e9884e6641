//! The kernel half of confinement: the eBPF programs, where they are attached and pinned,
//! and the maps through which userspace tells them what each agent may do.
//!
//! Everything lives under one pin directory in bpffs (`/sys/fs/bpf/enforcer` by default):
//! `maps/` holds the policy, counter, event and gateway-port maps, `links/` one pinned link
//! per program.
//! Pinned links keep the programs attached when no process holds them, so the agent stays
//! confined when the enforcer exits or is killed; a new enforcer process adopts the pins
//! instead of re-attaching, so there is never a moment of open enforcement. When the pinned
//! programs come from another build, the new build's programs replace them inside the same
//! links (`BPF_LINK_UPDATE`), again without a moment unguarded.
mod bpffs;
pub mod events;
pub mod features;
mod object;
mod query;
pub mod sock_diag;
pub mod swap;

use std::{
    fs::File,
    io,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::{HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, ProgramError,
        links::{FdLink, LinkError, PinnedLink},
    },
    util::nr_cpus,
};
use enforcer_common::{
    AgentCounters, AgentPolicy, STATE_ACTIVE, STATE_SUSPENDED, STATE_TRIPPED, hook, names,
};

pub use bpffs::ensure_bpffs;

/// The kernel programs of this build, as embedded in the binary (an eBPF ELF object).
pub fn ebpf_object() -> &'static [u8] {
    object::EBPF_OBJECT
}

/// Where the enforcer pins its maps and links unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/enforcer";

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "loading the eBPF object failed: {source}. If {pin_dir} holds pins of an \
         incompatible enforcer version, remove them with `enforcer unload`"
    )]
    Load {
        pin_dir: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("pinned link {path}: {source}")]
    Link {
        path: PathBuf,
        #[source]
        source: Box<LinkError>,
    },
    #[error("map {name} pinned at {path}: {source}")]
    Map {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: Box<MapError>,
    },
    #[error(
        "no enforcer programs are pinned at {0}; start an agent with `enforcer confine` \
         (or the daemon) first, or pass the --pin-dir the enforcer was started with"
    )]
    NotInstalled(PathBuf),
    #[error(
        "stale pin {path}: {why}. Remove the stale state with `enforcer unload` and start again"
    )]
    StalePin { path: PathBuf, why: String },
    #[error(
        "{path} was pinned by an enforcer build with another layout ({why}), so this build's \
         programs cannot take over from it in place; the agents it confines stay confined. \
         Stop them and remove the old state with `enforcer unload --force`, then start again"
    )]
    IncompatiblePin { path: PathBuf, why: String },
    #[error("replacing the program behind {path}: {source}")]
    Replace {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "program {program} is not in effect on cgroup {cgroup}: refusing to run an agent \
         there unconfined"
    )]
    NotInEffect {
        program: &'static str,
        cgroup: PathBuf,
    },
    #[error(
        "this kernel lacks what the enforcer needs to confine agents, so it refuses to run: \
         {}. Linux {} or newer built with CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF has all of it",
        .0.join("; "),
        features::MINIMUM_KERNEL
    )]
    MissingFeatures(Vec<String>),
    #[error("no agent with cgroup id {0} has a policy entry")]
    UnknownAgent(u64),
    #[error("the kernel did not say which CPUs exist: {0}")]
    Cpus(String),
}

impl KernelError {
    fn io(context: impl Into<String>, source: io::Error) -> Self {
        KernelError::Io {
            context: context.into(),
            source,
        }
    }
}

/// How one program is attached.
#[derive(Clone, Copy, Debug)]
enum Attach {
    SockAddr,
    SkbEgress,
    Sock,
}

/// One kernel program: its name in the object, how it is attached, and the kernel's
/// attach type number (for `BPF_PROG_QUERY`).
#[derive(Clone, Copy, Debug)]
struct ProgramSpec {
    name: &'static str,
    attach: Attach,
    attach_type: u32,
}

const PROGRAMS: [ProgramSpec; 8] = [
    ProgramSpec {
        name: names::PROG_CONNECT4,
        attach: Attach::SockAddr,
        attach_type: query::BPF_CGROUP_INET4_CONNECT,
    },
    ProgramSpec {
        name: names::PROG_CONNECT6,
        attach: Attach::SockAddr,
        attach_type: query::BPF_CGROUP_INET6_CONNECT,
    },
    ProgramSpec {
        name: names::PROG_SENDMSG4,
        attach: Attach::SockAddr,
        attach_type: query::BPF_CGROUP_UDP4_SENDMSG,
    },
    ProgramSpec {
        name: names::PROG_SENDMSG6,
        attach: Attach::SockAddr,
        attach_type: query::BPF_CGROUP_UDP6_SENDMSG,
    },
    ProgramSpec {
        name: names::PROG_SKB_EGRESS,
        attach: Attach::SkbEgress,
        attach_type: query::BPF_CGROUP_INET_EGRESS,
    },
    ProgramSpec {
        name: names::PROG_SOCK_CREATE,
        attach: Attach::Sock,
        attach_type: query::BPF_CGROUP_INET_SOCK_CREATE,
    },
    ProgramSpec {
        name: names::PROG_BIND4,
        attach: Attach::SockAddr,
        attach_type: query::BPF_CGROUP_INET4_BIND,
    },
    ProgramSpec {
        name: names::PROG_BIND6,
        attach: Attach::SockAddr,
        attach_type: query::BPF_CGROUP_INET6_BIND,
    },
];

/// The pinned enforcement state: programs attached to the agents' parent cgroup and the
/// maps that steer them.
pub struct Enforcement {
    pin_dir: PathBuf,
    policy: HashMap<MapData, u64, AgentPolicy>,
    counters: PerCpuHashMap<MapData, u64, AgentCounters>,
    lost_events: PerCpuArray<MapData, u64>,
    /// Gateway port → the cgroup of one agent whose entry names it; agents may not bind it.
    gateway_ports: HashMap<MapData, u16, u64>,
    /// Kernel ids of our programs, in `PROGRAMS` order.
    program_ids: Vec<u32>,
}

impl Enforcement {
    /// Attaches the programs to `parent_cgroup` and pins them under `pin_dir`, or adopts the
    /// pins a previous enforcer process left there. Programs already pinned stay attached
    /// throughout; missing ones are attached. A pin that no longer guards `parent_cgroup`
    /// is reported as stale rather than silently trusted.
    pub fn install_or_adopt(pin_dir: &Path, parent_cgroup: &Path) -> Result<Self, KernelError> {
        ensure_bpffs(pin_dir)?;
        let maps_dir = pin_dir.join("maps");
        let links_dir = pin_dir.join("links");
        for dir in [pin_dir, &maps_dir, &links_dir] {
            std::fs::create_dir_all(dir)
                .map_err(|e| KernelError::io(format!("creating {}", dir.display()), e))?;
        }
        let cgroup = File::open(parent_cgroup).map_err(|e| {
            KernelError::io(format!("opening cgroup {}", parent_cgroup.display()), e)
        })?;
        // Two enforcer processes starting at once must not both attach and race to pin:
        // the loser's pin would fail after its programs were attached.
        let lock_handle = File::open(parent_cgroup).map_err(|e| {
            KernelError::io(format!("opening cgroup {}", parent_cgroup.display()), e)
        })?;
        let _install_lock =
            nix::fcntl::Flock::lock(lock_handle, nix::fcntl::FlockArg::LockExclusive).map_err(
                |(_, errno)| {
                    KernelError::io(format!("locking {}", parent_cgroup.display()), errno.into())
                },
            )?;

        let missing: Vec<&ProgramSpec> = PROGRAMS
            .iter()
            .filter(|spec| !links_dir.join(spec.name).exists())
            .collect();
        if !missing.is_empty() {
            let lacking = features::missing();
            if !lacking.is_empty() {
                return Err(KernelError::MissingFeatures(lacking));
            }
        }
        let load_err = |source: aya::EbpfError| KernelError::Load {
            pin_dir: pin_dir.to_owned(),
            source: Box::new(source),
        };
        let object = aya_obj::Object::parse(object::EBPF_OBJECT)
            .map_err(|e| load_err(aya::EbpfError::ParseError(e)))?;
        check_map_layouts(&maps_dir, &object)?;
        // This build's programs are loaded even when every link is pinned: the kernel's tag
        // of each (a hash of its instructions) says whether the pinned one is the same
        // program. Maps with pinning are reused from `maps_dir` when already pinned, so the
        // programs share state with any that are still pinned.
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(object::EBPF_OBJECT)
            .map_err(load_err)?;
        for spec in &PROGRAMS {
            load_program(&mut ebpf, spec)?;
            let link_path = links_dir.join(spec.name);
            if missing.iter().any(|m| m.name == spec.name) {
                attach_and_pin(&mut ebpf, spec, &cgroup, &link_path)?;
                tracing::info!(program = spec.name, cgroup = %parent_cgroup.display(), "attached");
            } else {
                replace_if_changed(&ebpf, spec, &link_path)?;
            }
        }
        let mut enforcement = Self::open(pin_dir)?;
        enforcement.verify_attached(parent_cgroup, &cgroup)?;
        enforcement.reserve_missing_gateway_ports()?;
        Ok(enforcement)
    }

    /// Opens the pins of an installed enforcer without attaching anything.
    pub fn open(pin_dir: &Path) -> Result<Self, KernelError> {
        let maps_dir = pin_dir.join("maps");
        let links_dir = pin_dir.join("links");
        if !maps_dir.join(names::POLICY_MAP).exists() {
            return Err(KernelError::NotInstalled(pin_dir.to_owned()));
        }
        let mut program_ids = Vec::with_capacity(PROGRAMS.len());
        for spec in &PROGRAMS {
            let path = links_dir.join(spec.name);
            if !path.exists() {
                return Err(KernelError::StalePin {
                    path,
                    why: "the policy map is pinned but this program's link is not".into(),
                });
            }
            let link = PinnedLink::from_pin(&path).map_err(|source| KernelError::Link {
                path: path.clone(),
                source: Box::new(source),
            })?;
            let info = FdLink::from(link)
                .info()
                .map_err(|source| KernelError::Link {
                    path: path.clone(),
                    source: Box::new(source),
                })?;
            program_ids.push(info.program_id());
        }
        let policy = HashMap::try_from(open_map(&maps_dir, names::POLICY_MAP)?)
            .map_err(|e| map_error(&maps_dir, names::POLICY_MAP, e))?;
        let counters = PerCpuHashMap::try_from(open_map(&maps_dir, names::COUNTERS_MAP)?)
            .map_err(|e| map_error(&maps_dir, names::COUNTERS_MAP, e))?;
        let lost_events = PerCpuArray::try_from(open_map(&maps_dir, names::LOST_EVENTS_MAP)?)
            .map_err(|e| map_error(&maps_dir, names::LOST_EVENTS_MAP, e))?;
        let gateway_ports = HashMap::try_from(open_map(&maps_dir, names::GATEWAY_PORTS_MAP)?)
            .map_err(|e| map_error(&maps_dir, names::GATEWAY_PORTS_MAP, e))?;
        Ok(Self {
            pin_dir: pin_dir.to_owned(),
            policy,
            counters,
            lost_events,
            gateway_ports,
            program_ids,
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Each program's name and kernel id. Ids stay the same for as long as the pins do, so
    /// they show whether a restart adopted the programs or attached new ones.
    pub fn programs(&self) -> Vec<(&'static str, u32)> {
        PROGRAMS
            .iter()
            .map(|spec| spec.name)
            .zip(self.program_ids.iter().copied())
            .collect()
    }

    /// Checks that every pinned program is attached to `parent` itself.
    fn verify_attached(&self, parent: &Path, cgroup: &File) -> Result<(), KernelError> {
        for (spec, id) in PROGRAMS.iter().zip(&self.program_ids) {
            let attached =
                query::attached_programs(cgroup, spec.attach_type, false).map_err(|e| {
                    KernelError::io(format!("querying programs of {}", parent.display()), e)
                })?;
            if !attached.contains(id) {
                return Err(KernelError::StalePin {
                    path: self.pin_dir.join("links").join(spec.name),
                    why: format!(
                        "its program (id {id}) is not attached to {}; the pins belong to \
                         another cgroup parent or the cgroup was recreated",
                        parent.display()
                    ),
                });
            }
        }
        Ok(())
    }

    /// Checks that every program is in effect for `cgroup` (an agent cgroup), so that a
    /// process placed there is confined. Callers refuse to start the agent otherwise.
    pub fn verify_in_effect(&self, cgroup: &Path) -> Result<(), KernelError> {
        let file = File::open(cgroup)
            .map_err(|e| KernelError::io(format!("opening cgroup {}", cgroup.display()), e))?;
        for (spec, id) in PROGRAMS.iter().zip(&self.program_ids) {
            let effective =
                query::attached_programs(&file, spec.attach_type, true).map_err(|e| {
                    KernelError::io(format!("querying programs of {}", cgroup.display()), e)
                })?;
            if !effective.contains(id) {
                return Err(KernelError::NotInEffect {
                    program: spec.name,
                    cgroup: cgroup.to_owned(),
                });
            }
        }
        Ok(())
    }

    /// Writes (or replaces) an agent's policy. Its counters start from zero when new. Its
    /// gateway's port is reserved before the entry can open it, so no agent can bind the
    /// port at any moment the gateway is reachable but not listening.
    pub fn set_agent(&mut self, cgroup_id: u64, policy: &AgentPolicy) -> Result<(), KernelError> {
        if self.counters.get(&cgroup_id, 0).is_err() {
            let cpus = nr_cpus().map_err(|(_, e)| KernelError::Cpus(e.to_string()))?;
            let zeros = PerCpuValues::try_from(vec![AgentCounters::default(); cpus])
                .map_err(|e| KernelError::io("building per-CPU counters", e))?;
            self.counters
                .insert(cgroup_id, zeros, 0)
                .map_err(|e| self.map_err(names::COUNTERS_MAP, e))?;
        }
        let old_port = self
            .agent(cgroup_id)?
            .and_then(|p| p.gateway())
            .map(|g| g.port());
        let new_port = policy.gateway().map(|g| g.port());
        if let Some(port) = new_port {
            self.gateway_ports
                .insert(port, cgroup_id, 0)
                .map_err(|e| self.map_err(names::GATEWAY_PORTS_MAP, e))?;
        }
        self.policy
            .insert(cgroup_id, policy, 0)
            .map_err(|e| self.map_err(names::POLICY_MAP, e))?;
        if let Some(port) = old_port.filter(|&p| Some(p) != new_port)
            && let Err(e) = self.release_gateway_port(port, cgroup_id)
        {
            // The new entry is written; a port left reserved only keeps agents from it.
            tracing::warn!(port, error = %e, "a gateway port stays reserved");
        }
        Ok(())
    }

    /// Frees `port` for binding once `cgroup_id`'s entry no longer names it, unless another
    /// agent's entry does: the port then stays reserved in that agent's name.
    fn release_gateway_port(&mut self, port: u16, cgroup_id: u64) -> Result<(), KernelError> {
        match self.gateway_ports.get(&port, 0) {
            Ok(owner) if owner == cgroup_id => {}
            Ok(_) | Err(MapError::KeyNotFound) => return Ok(()),
            Err(e) => return Err(self.map_err(names::GATEWAY_PORTS_MAP, e)),
        }
        let other = self.agents()?.into_iter().find(|(id, policy)| {
            *id != cgroup_id && policy.gateway().is_some_and(|g| g.port() == port)
        });
        let result = match other {
            Some((id, _)) => self.gateway_ports.insert(port, id, 0),
            None => match self.gateway_ports.remove(&port) {
                Err(MapError::KeyNotFound) => Ok(()),
                other => other,
            },
        };
        result.map_err(|e| self.map_err(names::GATEWAY_PORTS_MAP, e))
    }

    /// Reserves the gateway port of every entry that lacks its reservation (entries written
    /// by a build without one). Never frees a port: another process may be between
    /// reserving a port and writing the entry that names it.
    fn reserve_missing_gateway_ports(&mut self) -> Result<(), KernelError> {
        for (id, policy) in self.agents()? {
            let Some(port) = policy.gateway().map(|g| g.port()) else {
                continue;
            };
            match self.gateway_ports.get(&port, 0) {
                Ok(_) => {}
                Err(MapError::KeyNotFound) => self
                    .gateway_ports
                    .insert(port, id, 0)
                    .map_err(|e| self.map_err(names::GATEWAY_PORTS_MAP, e))?,
                Err(e) => return Err(self.map_err(names::GATEWAY_PORTS_MAP, e)),
            }
        }
        Ok(())
    }

    /// Opens the agent's circuit: from the next hook run on, everything it sends is denied,
    /// its gateway included. One map update, so there is no moment of half-tripped state.
    pub fn trip(&mut self, cgroup_id: u64) -> Result<AgentPolicy, KernelError> {
        let mut policy = self
            .agent(cgroup_id)?
            .ok_or(KernelError::UnknownAgent(cgroup_id))?;
        policy.state = STATE_TRIPPED;
        self.policy
            .insert(cgroup_id, policy, 0)
            .map_err(|e| self.map_err(names::POLICY_MAP, e))?;
        Ok(policy)
    }

    /// Denies everything the agent sends while no gateway serves its address, in a state of
    /// its own that a later start may lift. Only an active entry is changed: one cut for
    /// another reason stays as it is, and false says so.
    pub fn suspend(&mut self, cgroup_id: u64) -> Result<bool, KernelError> {
        let mut policy = self
            .agent(cgroup_id)?
            .ok_or(KernelError::UnknownAgent(cgroup_id))?;
        if policy.state != STATE_ACTIVE {
            return Ok(false);
        }
        policy.state = STATE_SUSPENDED;
        self.policy
            .insert(cgroup_id, policy, 0)
            .map_err(|e| self.map_err(names::POLICY_MAP, e))?;
        Ok(true)
    }

    /// Removes an agent's policy and counters. Its cgroup, if it still exists, is then
    /// denied everything.
    pub fn remove_agent(&mut self, cgroup_id: u64) -> Result<(), KernelError> {
        // An entry that cannot be read is still removed; its port then stays reserved.
        let port = self
            .agent(cgroup_id)
            .ok()
            .flatten()
            .and_then(|p| p.gateway())
            .map(|g| g.port());
        match self.policy.remove(&cgroup_id) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(self.map_err(names::POLICY_MAP, e)),
        }
        match self.counters.remove(&cgroup_id) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(self.map_err(names::COUNTERS_MAP, e)),
        }
        if let Some(port) = port
            && let Err(e) = self.release_gateway_port(port, cgroup_id)
        {
            // The agent is gone; a port left reserved only keeps agents from binding it.
            tracing::warn!(port, error = %e, "a gateway port stays reserved");
        }
        Ok(())
    }

    pub fn agent(&self, cgroup_id: u64) -> Result<Option<AgentPolicy>, KernelError> {
        match self.policy.get(&cgroup_id, 0) {
            Ok(policy) => Ok(Some(policy)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(self.map_err(names::POLICY_MAP, e)),
        }
    }

    /// Every agent with a policy entry.
    pub fn agents(&self) -> Result<Vec<(u64, AgentPolicy)>, KernelError> {
        self.policy
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.map_err(names::POLICY_MAP, e))
    }

    /// The agent's counters summed over all CPUs.
    pub fn counters(&self, cgroup_id: u64) -> Result<AgentCounters, KernelError> {
        let per_cpu = match self.counters.get(&cgroup_id, 0) {
            Ok(values) => values,
            Err(MapError::KeyNotFound) => return Ok(AgentCounters::default()),
            Err(e) => return Err(self.map_err(names::COUNTERS_MAP, e)),
        };
        let mut sum = AgentCounters::default();
        for cpu in per_cpu.iter() {
            for i in 0..hook::COUNT {
                sum.allowed[i] = sum.allowed[i].saturating_add(cpu.allowed[i]);
                sum.denied[i] = sum.denied[i].saturating_add(cpu.denied[i]);
            }
        }
        Ok(sum)
    }

    /// Deny events the kernel could not queue because the ring buffer was full.
    pub fn lost_events(&self) -> Result<u64, KernelError> {
        let per_cpu = self
            .lost_events
            .get(&0, 0)
            .map_err(|e| self.map_err(names::LOST_EVENTS_MAP, e))?;
        Ok(per_cpu.iter().fold(0u64, |sum, n| sum.saturating_add(*n)))
    }

    fn map_err(&self, name: &'static str, source: MapError) -> KernelError {
        map_error(&self.pin_dir.join("maps"), name, source)
    }
}

/// Detaches every program and removes every pin under `pin_dir`. Agents that still run in
/// cgroups below the old parent are no longer confined afterwards, so callers stop them first.
pub fn unload(pin_dir: &Path) -> Result<(), KernelError> {
    let links_dir = pin_dir.join("links");
    for spec in &PROGRAMS {
        let path = links_dir.join(spec.name);
        if path.exists() {
            // Unpinning drops the last reference once our fd closes, which detaches it.
            let link = PinnedLink::from_pin(&path).map_err(|source| KernelError::Link {
                path: path.clone(),
                source: Box::new(source),
            })?;
            link.unpin()
                .map_err(|e| KernelError::io(format!("unpinning {}", path.display()), e))?;
        }
    }
    for dir in [&links_dir, &pin_dir.join("maps")] {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(KernelError::io(format!("reading {}", dir.display()), e)),
        };
        for entry in entries {
            let entry =
                entry.map_err(|e| KernelError::io(format!("reading {}", dir.display()), e))?;
            std::fs::remove_file(entry.path())
                .map_err(|e| KernelError::io(format!("removing {}", entry.path().display()), e))?;
        }
        std::fs::remove_dir(dir)
            .map_err(|e| KernelError::io(format!("removing {}", dir.display()), e))?;
    }
    match std::fs::remove_dir(pin_dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(KernelError::io(
            format!("removing {}", pin_dir.display()),
            e,
        )),
    }
}

/// Loads (verifies) one of this build's programs into the kernel.
fn load_program(ebpf: &mut aya::Ebpf, spec: &ProgramSpec) -> Result<(), KernelError> {
    let prog_err = |source: ProgramError| KernelError::Program {
        name: spec.name,
        source: Box::new(source),
    };
    let program = ebpf
        .program_mut(spec.name)
        .ok_or_else(|| prog_err(ProgramError::UnexpectedProgramType))?;
    match spec.attach {
        Attach::SockAddr => {
            let program: &mut CgroupSockAddr = program.try_into().map_err(prog_err)?;
            program.load().map_err(prog_err)
        }
        Attach::SkbEgress => {
            let program: &mut CgroupSkb = program.try_into().map_err(prog_err)?;
            program.load().map_err(prog_err)
        }
        Attach::Sock => {
            let program: &mut CgroupSock = program.try_into().map_err(prog_err)?;
            program.load().map_err(prog_err)
        }
    }
}

/// Puts this build's (loaded) program behind the pinned link at `link_path` if the link
/// runs a different one. The link stays attached throughout and the kernel switches
/// programs atomically, so the agents are never unguarded.
fn replace_if_changed(
    ebpf: &aya::Ebpf,
    spec: &ProgramSpec,
    link_path: &Path,
) -> Result<(), KernelError> {
    let replace_err = |source: io::Error| KernelError::Replace {
        path: link_path.to_owned(),
        source,
    };
    let new = ebpf
        .program(spec.name)
        .ok_or_else(|| KernelError::Program {
            name: spec.name,
            source: Box::new(ProgramError::UnexpectedProgramType),
        })?
        .fd()
        .map_err(|source| KernelError::Program {
            name: spec.name,
            source: Box::new(source),
        })?;
    let link = swap::open_pinned(link_path).map_err(replace_err)?;
    let (_, old) = swap::link_program(link.as_fd()).map_err(replace_err)?;
    let old_identity = swap::program_identity(old.as_fd()).map_err(replace_err)?;
    let new_identity = swap::program_identity(new.as_fd()).map_err(replace_err)?;
    if old_identity.tag == new_identity.tag {
        return Ok(());
    }
    swap::replace_program(link.as_fd(), new.as_fd(), old.as_fd()).map_err(replace_err)?;
    tracing::info!(
        program = spec.name,
        old_id = old_identity.id,
        new_id = new_identity.id,
        "replaced another build's program in its pinned link"
    );
    Ok(())
}

/// Refuses pinned maps whose layout is not this build's: programs loaded against them
/// would read and write the other build's structures as their own.
fn check_map_layouts(maps_dir: &Path, object: &aya_obj::Object) -> Result<(), KernelError> {
    for (name, def) in &object.maps {
        if def.pinning() != aya_obj::maps::PinningType::ByName {
            continue;
        }
        let path = maps_dir.join(name);
        if !path.exists() {
            continue;
        }
        let pinned = swap::pinned_map_layout(&path)
            .map_err(|e| KernelError::io(format!("reading {}", path.display()), e))?;
        let differences: Vec<String> = [
            ("type", pinned.map_type, def.map_type()),
            ("key size", pinned.key_size, def.key_size()),
            ("value size", pinned.value_size, def.value_size()),
            ("max entries", pinned.max_entries, def.max_entries()),
            ("flags", pinned.map_flags, def.map_flags()),
        ]
        .into_iter()
        .filter(|(_, pinned, ours)| pinned != ours)
        .map(|(what, pinned, ours)| format!("{what} {pinned}, this build {ours}"))
        .collect();
        if !differences.is_empty() {
            return Err(KernelError::IncompatiblePin {
                path,
                why: differences.join(", "),
            });
        }
    }
    Ok(())
}

fn attach_and_pin(
    ebpf: &mut aya::Ebpf,
    spec: &ProgramSpec,
    cgroup: &File,
    pin_path: &Path,
) -> Result<(), KernelError> {
    let prog_err = |source: ProgramError| KernelError::Program {
        name: spec.name,
        source: Box::new(source),
    };
    let program = ebpf
        .program_mut(spec.name)
        .ok_or_else(|| KernelError::Program {
            name: spec.name,
            source: Box::new(ProgramError::UnexpectedProgramType),
        })?;
    // Single mode on a bpf_link still lets the kernel run programs attached below (they can
    // only deny more), but nothing below can replace ours.
    let link: FdLink = match spec.attach {
        Attach::SockAddr => {
            let program: &mut CgroupSockAddr = program.try_into().map_err(prog_err)?;
            let id = program
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(prog_err)?;
            program
                .take_link(id)
                .map_err(prog_err)?
                .try_into()
                .map_err(|e: LinkError| KernelError::Link {
                    path: pin_path.to_owned(),
                    source: Box::new(e),
                })?
        }
        Attach::SkbEgress => {
            let program: &mut CgroupSkb = program.try_into().map_err(prog_err)?;
            let id = program
                .attach(
                    cgroup,
                    CgroupSkbAttachType::Egress,
                    CgroupAttachMode::Single,
                )
                .map_err(prog_err)?;
            program
                .take_link(id)
                .map_err(prog_err)?
                .try_into()
                .map_err(|e: LinkError| KernelError::Link {
                    path: pin_path.to_owned(),
                    source: Box::new(e),
                })?
        }
        Attach::Sock => {
            let program: &mut CgroupSock = program.try_into().map_err(prog_err)?;
            let id = program
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(prog_err)?;
            program
                .take_link(id)
                .map_err(prog_err)?
                .try_into()
                .map_err(|e: LinkError| KernelError::Link {
                    path: pin_path.to_owned(),
                    source: Box::new(e),
                })?
        }
    };
    link.pin(pin_path).map_err(|e| {
        KernelError::io(
            format!("pinning {}: {e}", pin_path.display()),
            io::Error::other(e.to_string()),
        )
    })?;
    Ok(())
}

fn open_map(maps_dir: &Path, name: &'static str) -> Result<Map, KernelError> {
    let data = MapData::from_pin(maps_dir.join(name)).map_err(|e| map_error(maps_dir, name, e))?;
    Map::from_map_data(data).map_err(|e| map_error(maps_dir, name, e))
}

fn map_error(maps_dir: &Path, name: &'static str, source: MapError) -> KernelError {
    KernelError::Map {
        name,
        path: maps_dir.join(name),
        source: Box::new(source),
    }
}

/// `CLOCK_BOOTTIME` now, in nanoseconds: the clock the kernel programs compare deadlines to.
pub fn boottime_now_ns() -> Result<u64, KernelError> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map_err(|e| KernelError::io("reading CLOCK_BOOTTIME", e.into()))?;
    Ok((now.tv_sec() as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(now.tv_nsec() as u64))
}
