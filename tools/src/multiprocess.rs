//! `generate` as one process of a multi-process job: a launcher (our `launch`, torchrun, srun,
//! mpirun) set this process's rank and the rendezvous address ([`WorldEnv`]).
//!
//! * Ranks: `--devices` lists the node's devices. One entry: every process of the node runs one
//!   rank on it. Otherwise the entries are split evenly over the node's processes, in order: the
//!   process of local rank l holds entries `l*k..(l+1)*k` (k = entries / processes), as logical
//!   ranks `p*k..(p+1)*k` of `W = processes x k` (p: the process's global rank). Every node must
//!   list the same number of entries per process (the request digest compares W).
//! * Rendezvous: the process of global rank 0 serves the store on `MASTER_PORT`; every process is
//!   a client. Each publishes the schedule it chose for its own ranks and budget, and the job runs
//!   their merge ([`agree_schedule`]); then each publishes its request digest (the job's schedule
//!   in it) and compares it with every other's, before any weight is loaded.
//! * Data plane: each logical rank connects its own [`TcpComm`]; ranks of one process are threads.
//!   Under `--comm nccl` (or `auto`, when every rank has a GPU of its own and the NCCL library),
//!   the ranks first agree through the store, then each joins one NCCL communicator (rank 0
//!   publishes its unique id in the store) and tensors move GPU to GPU; the TCP links carry the
//!   control plane only.
//!   Logical rank 0 (in the process of global rank 0) runs on the calling thread and writes the
//!   video; no other process touches the outputs.
//! * Every wait (store, connections, each message) is bounded by `--rank-timeout`.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use std::path::Path;

use vi_model::checkpoint::Checkpointing;
use vi_model::models::{ModelPaths, Models};
use vi_model::pipeline::{self, Event, FrameSink, GenerateRequest};
use vi_model::request_digest::{check_same_request, ModelSource, RequestDigest};
use vi_model::schedule::{DeviceTurn, Schedule};
use vi_runtime::comm::{
    agree_on_nccl, connect_nccl, Communicator, Rendezvous, StoreClient, StoreServer, TcpComm,
    TcpConfig, WorldEnv,
};
use vi_runtime::{DType, Device};

use crate::cli::PartArgs;

/// `--rank-timeout` when none is given: 30 s past a generous bound on the slowest step (600 s:
/// a full-size UNet step on a GPU takes seconds; a CPU run of the full-size model needs more: pass
/// `--rank-timeout`). It bounds every wait on another rank: the rendezvous, the first message
/// after the peers load their weights, each exchange.
pub const DEFAULT_RANK_TIMEOUT: Duration = Duration::from_secs(630);

/// How long rank 0 waits, when the requests differ, for the other processes to read them.
const DIGEST_READ_WAIT: Duration = Duration::from_secs(10);

/// The logical ranks this process holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Logical ranks of the whole job.
    pub world: usize,
    /// This process's first logical rank; it holds `first..first + devices.len()`.
    pub first: usize,
    /// The device of each of its ranks.
    pub devices: Vec<Device>,
}

impl Placement {
    /// Splits the node's `--devices` entries (`spec` for messages) over its processes.
    pub fn new(node_devices: &[Device], spec: &str, env: &WorldEnv) -> Result<Placement> {
        let n = node_devices.len();
        let procs = env.local_world_size;
        let devices = if n == 1 {
            vec![node_devices[0]]
        } else {
            ensure!(
                n.is_multiple_of(procs),
                "--devices {spec} lists {n} ranks for the {procs} processes on this node \
                 ({} environment): give one device for all, or a multiple of {procs} (each \
                 process takes an equal share, in order)",
                env.source
            );
            let k = n / procs;
            node_devices[env.local_rank * k..(env.local_rank + 1) * k].to_vec()
        };
        let k = devices.len();
        Ok(Placement {
            world: env.world_size * k,
            first: env.rank * k,
            devices,
        })
    }

    pub fn ranks(&self) -> std::ops::Range<usize> {
        self.first..self.first + self.devices.len()
    }

    /// Whether this process holds logical rank 0 (and writes the video).
    pub fn writes(&self) -> bool {
        self.first == 0
    }
}

fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>> {
    let v: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve MASTER_ADDR {host}"))?
        .collect();
    ensure!(!v.is_empty(), "MASTER_ADDR {host} resolves to no address");
    Ok(v)
}

/// The rendezvous of this process: the store (served here on global rank 0) and a client per
/// caller.
pub struct Job {
    pub env: WorldEnv,
    pub timeout: Duration,
    /// Every address is on this machine (bind and advertise 127.0.0.1 only).
    loopback: bool,
    server: Option<StoreServer>,
}

impl Job {
    /// Starts the store on global rank 0 (port in use: an error naming it); checks MASTER_ADDR.
    pub fn start(env: WorldEnv, timeout: Duration) -> Result<Job> {
        let loopback = resolve(&env.master_addr, env.master_port)?
            .iter()
            .all(|a| a.ip().is_loopback());
        let server = if env.rank == 0 {
            let host = if loopback { "127.0.0.1" } else { "0.0.0.0" };
            Some(
                StoreServer::bind(&format!("{host}:{}", env.master_port))
                    .context("rank 0 cannot serve the rendezvous store")?,
            )
        } else {
            None
        };
        Ok(Job {
            env,
            timeout,
            loopback,
            server,
        })
    }

    /// A new connection to the store (each thread that blocks on it needs its own).
    pub fn client(&self) -> Result<StoreClient> {
        Ok(StoreClient::connect(
            &self.env.master_addr,
            self.env.master_port,
            self.timeout,
        )?)
    }

    /// Every process publishes `digest` and compares it with the others' (an error names the
    /// fields and the ranks, the same on every rank).
    pub fn check_request(&self, store: &StoreClient, digest: &RequestDigest) -> Result<()> {
        check_same_request(
            store,
            self.env.rank,
            self.env.world_size,
            digest,
            self.timeout,
        )?;
        Ok(())
    }

    /// How the logical ranks' TCP links bind and advertise themselves.
    pub fn tcp_config(&self) -> Result<TcpConfig> {
        let mut c = TcpConfig::loopback(self.timeout);
        if !self.loopback {
            c.bind_host = "0.0.0.0".into();
            c.advertise_host = route_to(&self.env.master_addr, self.env.master_port)?.to_string();
        }
        Ok(c)
    }

    /// Runs this process's logical ranks of `req` (`models_of(rank)`: the models of a logical
    /// rank held here); logical rank 0 runs on the calling thread with `sink`.
    pub fn run<'m>(
        &self,
        place: &Placement,
        models_of: &(dyn Fn(usize) -> &'m Models + Sync),
        req: &GenerateRequest,
        sink: Option<&mut dyn FrameSink>,
        progress: &(dyn Fn(Event) + Sync),
        ckpt: Option<&Checkpointing<'_>>,
    ) -> Result<()> {
        ensure!(
            req.world == place.world,
            "the request has {} ranks, the placement {}",
            req.world,
            place.world
        );
        let cfg = self.tcp_config()?;
        // Under rank turns (the plan counted on them): one turn per distinct device of this
        // process, shared by its logical ranks on that device (ranks in other processes hold
        // their own device memory, or are planned by their own process).
        let mut turns: Vec<(Device, DeviceTurn)> = Vec::new();
        if req.schedule.rank_turns {
            for rank in place.ranks() {
                let d = models_of(rank).device;
                if !turns.iter().any(|(x, _)| *x == d) {
                    turns.push((d, DeviceTurn::new(req.rank_timeout)));
                }
            }
        }
        let run_one = |rank: usize, sink: Option<&mut dyn FrameSink>| -> Result<()> {
            let store = self.client()?;
            let device = models_of(rank).device;
            // The data plane, decided identically by every rank (`--comm`).
            let nccl = agree_on_nccl(
                &store,
                "nccl/ready",
                rank,
                place.world,
                device,
                req.comm,
                self.timeout,
            )
            .with_context(|| format!("rank {rank}: choosing the data plane"))?;
            // Received tensors land on the rank's device (a GPU rank's halos, tokens, frames);
            // under NCCL the TCP links carry only the control plane, whose tensors stay on the
            // host (NCCL's communicator moves what it passes on to the device itself).
            let mut cfg = cfg.clone();
            if device != Device::Cpu && !nccl {
                cfg.device = Some(device);
            }
            let tcp = TcpComm::connect(rank, place.world, &store, &cfg)
                .with_context(|| format!("rank {rank} cannot connect to its peers"))?;
            let comm: Box<dyn Communicator> = if nccl {
                connect_nccl(Box::new(tcp), device, &store, "nccl/id", self.timeout)
                    .with_context(|| format!("rank {rank} cannot join the NCCL communicator"))?
            } else {
                Box::new(tcp)
            };
            store.mark_done()?;
            drop(store);
            let sink = sink.map(|s| s as &mut dyn FrameSink);
            let turn = turns.iter().find(|(d, _)| *d == device).map(|(_, t)| t);
            let r = pipeline::generate_rank_with_turn(
                models_of(rank),
                &*comm,
                req,
                sink,
                progress,
                turn,
                ckpt,
            );
            if let Err(e) = &r {
                // Every peer fails at once, with this reason.
                comm.abort(&format!("rank {rank} failed: {e}"));
            }
            r.with_context(|| format!("rank {rank}"))
        };
        let mut ranks = place.ranks();
        let first = ranks.next().expect("a process holds at least one rank");
        let result = std::thread::scope(|s| {
            let others: Vec<_> = ranks
                .map(|r| {
                    let run_one = &run_one;
                    std::thread::Builder::new()
                        .name(format!("rank-{r}"))
                        .spawn_scoped(s, move || run_one(r, None))
                })
                .collect::<std::io::Result<_>>()
                .context("cannot start a rank thread")?;
            let mine = run_one(first, sink);
            let mut results = vec![mine];
            for h in others {
                results.push(h.join().unwrap_or_else(|_| bail!("a rank thread panicked")));
            }
            // The first failure (a rank failing because another did names that one).
            results.into_iter().collect::<Result<Vec<()>>>().map(|_| ())
        });
        result
    }

    /// After a successful run: global rank 0 keeps the store up until every logical rank is done
    /// with it (bounded).
    pub fn finish(self, world: usize) -> Result<()> {
        if let Some(s) = &self.server {
            s.wait_done(world, self.timeout)?;
        }
        Ok(())
    }
}

/// The digest of `req` run with `model` (`parts`: as given to `generate`) in `dtype`: what the
/// processes of a job, and a checkpoint and its resume, must agree on.
pub fn request_digest(
    req: &GenerateRequest,
    model: &str,
    parts: &PartArgs,
    dtype: DType,
) -> Result<RequestDigest> {
    let paths;
    let source = if model == "tiny" || model == crate::generate::RANDOM_FULL {
        ModelSource::Embedded(model)
    } else {
        paths = ModelPaths::with_overrides(
            Some(Path::new(model)),
            parts.unet.as_deref(),
            parts.text_encoder.as_deref(),
            parts.vae.as_deref(),
            parts.tokenizer.as_deref(),
        )
        .with_context(|| format!("cannot load model {model}"))?;
        ModelSource::Files(&paths)
    };
    Ok(RequestDigest::new(req, source, dtype)?)
}

/// The store key of the schedule process `rank` chose.
fn schedule_key(rank: usize) -> String {
    format!("schedule/{rank}")
}

/// Every process publishes the schedule it chose (`mine`: for its own ranks, clips and budget)
/// and reads every other's; the job's schedule is their merge ([`Schedule::merge`]: the most
/// constrained in every part, hence at least as constrained as each process needs), the same on
/// every process. Why not rank 0's choice alone: each process's budget is its own devices' free
/// memory, which rank 0 does not know. Each wait is bounded by `timeout`.
pub fn agree_schedule(
    store: &dyn Rendezvous,
    rank: usize,
    world: usize,
    mine: Schedule,
    timeout: Duration,
) -> Result<Schedule> {
    store.set(&schedule_key(rank), mine.spec().as_bytes())?;
    let mut job = mine;
    for r in (0..world).filter(|&r| r != rank) {
        let bytes = store.get(&schedule_key(r), timeout).with_context(|| {
            format!("process {r} did not publish its schedule within {timeout:?}")
        })?;
        let spec = String::from_utf8_lossy(&bytes);
        let theirs = Schedule::parse(&spec)
            .map_err(|e| anyhow::anyhow!("process {r} published a bad schedule: {e}"))?;
        job = job.merge(theirs);
    }
    Ok(job)
}

/// Starts this process's part of the rendezvous (`model`, `parts`: as given to `generate`;
/// `dtype`: the models' storage dtype here): agrees on the job's schedule (`req.schedule`: this
/// process's choice on entry, the job's on return; `replan(job's)` re-plans this process under
/// it) and checks that every process runs the same request; prints where this process stands.
#[allow(clippy::too_many_arguments)]
pub fn rendezvous(
    env: WorldEnv,
    place: &Placement,
    timeout: Duration,
    req: &mut GenerateRequest,
    replan: &dyn Fn(Schedule) -> Result<()>,
    model: &str,
    parts: &PartArgs,
    dtype: DType,
) -> Result<Job> {
    let job = Job::start(env, timeout)?;
    let store = job.client()?;
    let agreed = agree_schedule(
        &store,
        job.env.rank,
        job.env.world_size,
        req.schedule,
        timeout,
    )?;
    // A process the job's schedule does not fit says so in its digest, so that every process
    // fails at once (rather than waiting for its digest until the timeout).
    let fit = replan(agreed);
    req.schedule = agreed;
    let mut digest = request_digest(req, model, parts, dtype)?;
    digest.push("schedule_fits", if fit.is_ok() { "yes" } else { "no" });
    let checked = job.check_request(&store, &digest);
    // Rank 0's store must outlive every process's reading of the digests, also when they differ
    // (each process then reports the difference itself): each says it has read them, and rank 0
    // waits for that (bounded) before it fails.
    let read_key = |r: usize| format!("digest-read/{r}");
    let _ = store.set(&read_key(job.env.rank), b"1");
    if checked.is_err() && job.server.is_some() {
        let keys: Vec<String> = (0..job.env.world_size).map(read_key).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let _ = store.wait(&keys, timeout.min(DIGEST_READ_WAIT));
    }
    fit?;
    checked?;
    let r = place.ranks();
    eprintln!(
        "   ranks: process {} of {} ({}), rank{} {} of {}, store {}:{}; every process runs the \
         same request",
        job.env.rank,
        job.env.world_size,
        job.env.source,
        if r.len() == 1 { "" } else { "s" },
        if r.len() == 1 {
            r.start.to_string()
        } else {
            format!("{}..{}", r.start, r.end - 1)
        },
        place.world,
        job.env.master_addr,
        job.env.master_port,
    );
    Ok(job)
}

/// This machine's address on the route to `host:port` (what the other nodes reach it by).
fn route_to(host: &str, port: u16) -> Result<IpAddr> {
    let target = resolve(host, port)?[0];
    let any: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().expect("valid")
    } else {
        "[::]:0".parse().expect("valid")
    };
    let s = UdpSocket::bind(any).context("cannot find this machine's address")?;
    s.connect(target)
        .with_context(|| format!("no route to MASTER_ADDR {host} ({target})"))?;
    Ok(s.local_addr()?.ip())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vi_runtime::comm::Launcher;

    fn env(rank: usize, world: usize, local: usize, local_world: usize) -> WorldEnv {
        WorldEnv {
            rank,
            world_size: world,
            local_rank: local,
            local_world_size: local_world,
            master_addr: "127.0.0.1".into(),
            master_port: 29500,
            source: Launcher::Torchrun,
        }
    }

    #[test]
    fn one_entry_is_shared_by_every_process() {
        let p = Placement::new(&[Device::Cpu], "cpu", &env(3, 4, 1, 2)).unwrap();
        assert_eq!(
            p,
            Placement {
                world: 4,
                first: 3,
                devices: vec![Device::Cpu]
            }
        );
        assert!(!p.writes());
    }

    #[test]
    fn entries_split_evenly_over_the_node() {
        let devs: Vec<Device> = (0..8).map(Device::Cuda).collect();
        // Node 1 of 2, 4 processes per node, 2 GPUs each: W = 8 processes x 2.
        let p = Placement::new(&devs, "cuda:0-7", &env(5, 8, 1, 4)).unwrap();
        assert_eq!(p.devices, vec![Device::Cuda(2), Device::Cuda(3)]);
        assert_eq!((p.world, p.ranks()), (16, 10..12));
        let e = Placement::new(&devs, "cuda:0-7", &env(0, 3, 0, 3)).unwrap_err();
        assert!(
            format!("{e}").contains("8 ranks for the 3 processes"),
            "{e}"
        );
    }
}
