//! "Who am I": this process's rank, the world size, its rank and the number of ranks on its node,
//! and the rendezvous store's address, from the environment its launcher set.
//!
//! Launchers are tried in this order; the first whose variables are present decides:
//! 1. torchrun (and our `launch`): `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`,
//!    `MASTER_ADDR`, `MASTER_PORT`, all six required once any of the first four is set.
//! 2. SLURM `srun`: `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`; ranks on this node from
//!    `SLURM_STEP_TASKS_PER_NODE`, else `SLURM_NTASKS_PER_NODE`, else `SLURM_TASKS_PER_NODE`
//!    (compressed `4(x2),3`, indexed by `SLURM_NODEID`); master `MASTER_ADDR`, else the first host
//!    of `SLURM_STEP_NODELIST`, else of `SLURM_JOB_NODELIST` (compressed `gpu[03-05,11],login1`,
//!    see [`expand_nodelist`]); port `MASTER_PORT`, else 15000 + the last 4 digits of
//!    `SLURM_JOB_ID`.
//! 3. Open MPI `mpirun`: `OMPI_COMM_WORLD_RANK`, `OMPI_COMM_WORLD_SIZE`,
//!    `OMPI_COMM_WORLD_LOCAL_RANK`, `OMPI_COMM_WORLD_LOCAL_SIZE`; `MASTER_ADDR` (default
//!    127.0.0.1 only when every rank is on this node), `MASTER_PORT` (default 29500).
//!
//! None of them: `Ok(None)`, a single process. Partial or inconsistent variables are an error
//! naming the variable.

use std::fmt;

use crate::{Error, Result};

/// Which launcher's variables described this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// torchrun, or our own `launch` (which sets the same variables).
    Torchrun,
    Slurm,
    OpenMpi,
}

impl fmt::Display for Launcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Launcher::Torchrun => "torchrun",
            Launcher::Slurm => "SLURM",
            Launcher::OpenMpi => "Open MPI",
        })
    }
}

/// This process's place in a multi-process job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorldEnv {
    /// Global rank, `0..world_size`.
    pub rank: usize,
    pub world_size: usize,
    /// Rank among the processes of this node, `0..local_world_size` (selects the device).
    pub local_rank: usize,
    pub local_world_size: usize,
    /// Host of the rendezvous store (rank 0's process).
    pub master_addr: String,
    pub master_port: u16,
    pub source: Launcher,
}

/// Default `MASTER_PORT` where the launcher gives none (torch's).
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// Longest node list [`expand_nodelist`] expands (a guard against absurd ranges).
pub const MAX_NODES: usize = 1 << 20;

const TORCHRUN_VARS: [&str; 6] = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
];

impl WorldEnv {
    /// From this process's environment.
    pub fn from_env() -> Result<Option<WorldEnv>> {
        WorldEnv::from_vars(|k| std::env::var(k).ok())
    }

    /// From an environment given as a lookup (`var(name)`: its value, None when unset).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<WorldEnv>> {
        // An empty variable counts as unset (shells often export `VAR=`).
        let var = |k: &str| var(k).filter(|v| !v.trim().is_empty());
        let env = if TORCHRUN_VARS[..4].iter().any(|k| var(k).is_some()) {
            torchrun(&var)?
        } else if var("SLURM_PROCID").is_some() {
            slurm(&var)?
        } else if var("OMPI_COMM_WORLD_RANK").is_some() || var("OMPI_COMM_WORLD_SIZE").is_some() {
            open_mpi(&var)?
        } else {
            return Ok(None);
        };
        env.validate()?;
        Ok(Some(env))
    }

    fn validate(&self) -> Result<()> {
        let src = self.source;
        let (rank, world, local_rank, local_world) = match src {
            Launcher::Torchrun => ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
            Launcher::Slurm => (
                "SLURM_PROCID",
                "SLURM_NTASKS",
                "SLURM_LOCALID",
                "SLURM_TASKS_PER_NODE",
            ),
            Launcher::OpenMpi => (
                "OMPI_COMM_WORLD_RANK",
                "OMPI_COMM_WORLD_SIZE",
                "OMPI_COMM_WORLD_LOCAL_RANK",
                "OMPI_COMM_WORLD_LOCAL_SIZE",
            ),
        };
        let bad = |msg: String| Err(Error::Msg(format!("{src} environment: {msg}")));
        if self.world_size == 0 {
            return bad(format!("{world}=0: a job has at least one rank"));
        }
        if self.rank >= self.world_size {
            return bad(format!(
                "{rank}={} is not below {world}={}",
                self.rank, self.world_size
            ));
        }
        if self.local_world_size == 0 || self.local_world_size > self.world_size {
            return bad(format!(
                "{local_world} gives {} ranks on this node, not in 1..={world}={}",
                self.local_world_size, self.world_size
            ));
        }
        if self.local_rank >= self.local_world_size {
            return bad(format!(
                "{local_rank}={} is not below the {} ranks on this node ({local_world})",
                self.local_rank, self.local_world_size
            ));
        }
        if self.master_port == 0 {
            return bad("MASTER_PORT=0: the store needs a fixed port every rank knows".into());
        }
        Ok(())
    }
}

fn parse_num<T: std::str::FromStr>(name: &str, value: &str) -> Result<T> {
    value.trim().parse().map_err(|_| {
        Error::Msg(format!(
            "environment variable {name}={value:?} is not a non-negative integer"
        ))
    })
}

fn parse_port(name: &str, value: &str) -> Result<u16> {
    match value.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(Error::Msg(format!(
            "environment variable {name}={value:?} is not a port (1..=65535)"
        ))),
    }
}

fn torchrun(var: &impl Fn(&str) -> Option<String>) -> Result<WorldEnv> {
    let set: Vec<&str> = TORCHRUN_VARS
        .iter()
        .copied()
        .filter(|k| var(k).is_some())
        .collect();
    let need = |k: &str| {
        var(k).ok_or_else(|| {
            Error::Msg(format!(
                "torchrun environment: {} set but {k} is not (a multi-process run needs all of {})",
                set.join(", "),
                TORCHRUN_VARS.join(", ")
            ))
        })
    };
    // Check presence of all six first, so the message names the missing one.
    let vals: Vec<String> = TORCHRUN_VARS
        .iter()
        .map(|k| need(k))
        .collect::<Result<_>>()?;
    Ok(WorldEnv {
        rank: parse_num("RANK", &vals[0])?,
        world_size: parse_num("WORLD_SIZE", &vals[1])?,
        local_rank: parse_num("LOCAL_RANK", &vals[2])?,
        local_world_size: parse_num("LOCAL_WORLD_SIZE", &vals[3])?,
        master_addr: vals[4].trim().to_string(),
        master_port: parse_port("MASTER_PORT", &vals[5])?,
        source: Launcher::Torchrun,
    })
}

fn slurm(var: &impl Fn(&str) -> Option<String>) -> Result<WorldEnv> {
    let need = |k: &str| {
        var(k).ok_or_else(|| {
            Error::Msg(format!(
                "SLURM environment: SLURM_PROCID is set but {k} is not"
            ))
        })
    };
    let rank: usize = parse_num("SLURM_PROCID", &need("SLURM_PROCID")?)?;
    let world_size: usize = parse_num("SLURM_NTASKS", &need("SLURM_NTASKS")?)?;
    let local_rank: usize = parse_num("SLURM_LOCALID", &need("SLURM_LOCALID")?)?;

    let nodelist_var = [
        "SLURM_STEP_NODELIST",
        "SLURM_JOB_NODELIST",
        "SLURM_NODELIST",
    ]
    .into_iter()
    .find_map(|k| var(k).map(|v| (k, v)));
    let nodes = match &nodelist_var {
        Some((k, v)) => Some(
            expand_nodelist(v)
                .map_err(|e| Error::Msg(format!("SLURM environment: {k}={v:?}: {e}")))?,
        ),
        None => None,
    };

    let local_world_size =
        match [
            "SLURM_STEP_TASKS_PER_NODE",
            "SLURM_NTASKS_PER_NODE",
            "SLURM_TASKS_PER_NODE",
        ]
        .into_iter()
        .find_map(|k| var(k).map(|v| (k, v)))
        {
            Some((k, v)) => {
                let counts = expand_tasks_per_node(&v)
                    .map_err(|e| Error::Msg(format!("SLURM environment: {k}={v:?}: {e}")))?;
                if counts.len() == 1 || counts.iter().all(|&c| c == counts[0]) {
                    counts[0]
                } else {
                    let node_id: usize = parse_num(
                        "SLURM_NODEID",
                        &var("SLURM_NODEID").ok_or_else(|| {
                            Error::Msg(format!(
                                "SLURM environment: {k}={v:?} differs between nodes and \
                             SLURM_NODEID is not set"
                            ))
                        })?,
                    )?;
                    *counts.get(node_id).ok_or_else(|| {
                        Error::Msg(format!(
                        "SLURM environment: SLURM_NODEID={node_id} but {k}={v:?} lists {} nodes",
                        counts.len()
                    ))
                    })?
                }
            }
            // No per-node count: only a one-node job tells us.
            None => match &nodes {
                Some(n) if n.len() == 1 => world_size,
                _ => return Err(Error::Msg(
                    "SLURM environment: SLURM_TASKS_PER_NODE is not set (ranks per node unknown)"
                        .into(),
                )),
            },
        };

    let master_addr = match var("MASTER_ADDR") {
        Some(a) => a.trim().to_string(),
        None => match (&nodelist_var, nodes) {
            (Some(_), Some(n)) => n.into_iter().next().unwrap_or_default(),
            _ => {
                return Err(Error::Msg(
                    "SLURM environment: neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST \
                     is set: set MASTER_ADDR"
                        .into(),
                ))
            }
        },
    };
    let master_port = match var("MASTER_PORT") {
        Some(p) => parse_port("MASTER_PORT", &p)?,
        None => {
            let job = var("SLURM_JOB_ID").ok_or_else(|| {
                Error::Msg(
                    "SLURM environment: neither MASTER_PORT nor SLURM_JOB_ID is set: set \
                     MASTER_PORT"
                        .into(),
                )
            })?;
            let job = job.trim();
            if job.is_empty() || !job.bytes().all(|b| b.is_ascii_digit()) {
                return Err(Error::Msg(format!(
                    "environment variable SLURM_JOB_ID={job:?} is not a job number: set \
                     MASTER_PORT"
                )));
            }
            let last4: u16 = job[job.len().saturating_sub(4)..].parse().unwrap_or(0);
            15000 + last4
        }
    };
    Ok(WorldEnv {
        rank,
        world_size,
        local_rank,
        local_world_size,
        master_addr,
        master_port,
        source: Launcher::Slurm,
    })
}

fn open_mpi(var: &impl Fn(&str) -> Option<String>) -> Result<WorldEnv> {
    let need = |k: &str| {
        var(k).ok_or_else(|| {
            Error::Msg(format!(
                "Open MPI environment: OMPI_COMM_WORLD_RANK / OMPI_COMM_WORLD_SIZE set but {k} \
                 is not"
            ))
        })
    };
    let rank: usize = parse_num("OMPI_COMM_WORLD_RANK", &need("OMPI_COMM_WORLD_RANK")?)?;
    let world_size: usize = parse_num("OMPI_COMM_WORLD_SIZE", &need("OMPI_COMM_WORLD_SIZE")?)?;
    let local_rank: usize = parse_num(
        "OMPI_COMM_WORLD_LOCAL_RANK",
        &need("OMPI_COMM_WORLD_LOCAL_RANK")?,
    )?;
    let local_world_size: usize = parse_num(
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        &need("OMPI_COMM_WORLD_LOCAL_SIZE")?,
    )?;
    let master_addr = match var("MASTER_ADDR") {
        Some(a) => a.trim().to_string(),
        None if local_world_size == world_size => "127.0.0.1".to_string(),
        None => {
            return Err(Error::Msg(format!(
                "Open MPI environment: the job spans several nodes ({local_world_size} of \
                 {world_size} ranks on this one) and MASTER_ADDR is not set: pass \
                 `-x MASTER_ADDR=<rank 0's host>` to mpirun"
            )))
        }
    };
    let master_port = match var("MASTER_PORT") {
        Some(p) => parse_port("MASTER_PORT", &p)?,
        None => DEFAULT_MASTER_PORT,
    };
    Ok(WorldEnv {
        rank,
        world_size,
        local_rank,
        local_world_size,
        master_addr,
        master_port,
        source: Launcher::OpenMpi,
    })
}

/// Splits `s` at commas outside brackets; an error on unbalanced or nested brackets.
fn split_top_level(s: &str) -> Result<Vec<&str>> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '[' if depth == 0 => depth = 1,
            '[' => return Err(Error::Msg(format!("nested '[' at byte {i}"))),
            ']' if depth == 1 => depth = 0,
            ']' => return Err(Error::Msg(format!("']' without '[' at byte {i}"))),
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(Error::Msg("'[' without ']'".into()));
    }
    parts.push(&s[start..]);
    Ok(parts)
}

/// The values of one bracket body such as `03-05,11` (zero padding: the width of the range's
/// first bound when it starts with 0, e.g. `08-10` gives 08, 09, 10).
fn expand_ranges(body: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for item in body.split(',') {
        let (lo, hi) = item.split_once('-').unwrap_or((item, item));
        let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
        if !digits(lo) || !digits(hi) {
            return Err(Error::Msg(format!("bad range {item:?} in [{body}]")));
        }
        let parse = |t: &str| {
            t.parse::<u64>()
                .map_err(|_| Error::Msg(format!("number {t:?} too large in [{body}]")))
        };
        let (a, b) = (parse(lo)?, parse(hi)?);
        if b < a {
            return Err(Error::Msg(format!("descending range {item:?} in [{body}]")));
        }
        if b - a >= MAX_NODES as u64 || out.len() + (b - a) as usize >= MAX_NODES {
            return Err(Error::Msg(format!(
                "range {item:?} expands to more than {MAX_NODES} names"
            )));
        }
        let width = if lo.len() > 1 && lo.starts_with('0') {
            lo.len()
        } else {
            0
        };
        out.extend((a..=b).map(|n| format!("{n:0width$}")));
    }
    Ok(out)
}

/// Expands a SLURM node list: `gpu[03-05,11],login1` -> gpu03, gpu04, gpu05, gpu11, login1.
/// Ranges keep the zero padding of their first bound; a name may hold several bracket groups
/// (`r[1-2]n[01-02]` -> r1n01, r1n02, r2n01, r2n02, the last group varying fastest). Malformed
/// lists (unbalanced or nested brackets, empty names or ranges, descending ranges) are errors.
pub fn expand_nodelist(list: &str) -> Result<Vec<String>> {
    let list = list.trim();
    if list.is_empty() {
        return Err(Error::Msg("empty node list".into()));
    }
    let mut hosts = Vec::new();
    for name in split_top_level(list)? {
        if name.is_empty() {
            return Err(Error::Msg(format!("empty host name in {list:?}")));
        }
        // Cartesian product over the name's literal pieces and bracket groups.
        let mut prefixes = vec![String::new()];
        let mut rest = name;
        while !rest.is_empty() {
            let (piece, choices): (&str, Vec<String>) = match rest.find('[') {
                Some(0) => {
                    let close = rest
                        .find(']')
                        .ok_or_else(|| Error::Msg(format!("'[' without ']' in {name:?}")))?;
                    let body = &rest[1..close];
                    if body.is_empty() {
                        return Err(Error::Msg(format!("empty [] in {name:?}")));
                    }
                    (&rest[..=close], expand_ranges(body)?)
                }
                Some(i) => (&rest[..i], vec![rest[..i].to_string()]),
                None => (rest, vec![rest.to_string()]),
            };
            rest = &rest[piece.len()..];
            if prefixes.len().saturating_mul(choices.len()) + hosts.len() > MAX_NODES {
                return Err(Error::Msg(format!(
                    "{list:?} expands to more than {MAX_NODES} names"
                )));
            }
            prefixes = prefixes
                .iter()
                .flat_map(|p| choices.iter().map(move |c| format!("{p}{c}")))
                .collect();
        }
        hosts.extend(prefixes);
    }
    Ok(hosts)
}

/// Expands SLURM's tasks-per-node form: `4(x2),3` -> [4, 4, 3].
pub fn expand_tasks_per_node(s: &str) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for item in s.trim().split(',') {
        let (n, rep) = match item.split_once('(') {
            Some((n, r)) => {
                let r = r
                    .strip_prefix('x')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| Error::Msg(format!("bad repeat {item:?}")))?;
                let r: usize = r
                    .parse()
                    .map_err(|_| Error::Msg(format!("bad repeat count in {item:?}")))?;
                (n, r)
            }
            None => (item, 1),
        };
        let n: usize = n
            .parse()
            .map_err(|_| Error::Msg(format!("bad task count {item:?}")))?;
        if out.len() + rep > MAX_NODES {
            return Err(Error::Msg(format!(
                "{s:?} lists more than {MAX_NODES} nodes"
            )));
        }
        out.extend(std::iter::repeat_n(n, rep));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Option<WorldEnv>> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        WorldEnv::from_vars(|k| m.get(k).cloned())
    }

    fn err(pairs: &[(&str, &str)]) -> String {
        env(pairs).unwrap_err().to_string()
    }

    const TORCH: [(&str, &str); 6] = [
        ("RANK", "3"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("MASTER_ADDR", "node0"),
        ("MASTER_PORT", "29511"),
    ];

    #[test]
    fn nothing_set_is_single_process() {
        assert_eq!(env(&[]).unwrap(), None);
        // MASTER_* alone (e.g. exported for later) does not make a job.
        assert_eq!(
            env(&[("MASTER_ADDR", "h"), ("MASTER_PORT", "1")]).unwrap(),
            None
        );
        assert_eq!(env(&[("RANK", "")]).unwrap(), None, "empty counts as unset");
    }

    #[test]
    fn torchrun_vars() {
        let w = env(&TORCH).unwrap().unwrap();
        assert_eq!(
            w,
            WorldEnv {
                rank: 3,
                world_size: 8,
                local_rank: 1,
                local_world_size: 2,
                master_addr: "node0".into(),
                master_port: 29511,
                source: Launcher::Torchrun,
            }
        );
        // torchrun wins over SLURM and Open MPI variables present at the same time.
        let mut both = TORCH.to_vec();
        both.extend([("SLURM_PROCID", "0"), ("OMPI_COMM_WORLD_RANK", "0")]);
        assert_eq!(env(&both).unwrap().unwrap().source, Launcher::Torchrun);
    }

    #[test]
    fn torchrun_partial_or_bad_is_named() {
        for missing in TORCHRUN_VARS {
            let pairs: Vec<_> = TORCH
                .iter()
                .copied()
                .filter(|(k, _)| *k != missing)
                .collect();
            let e = err(&pairs);
            assert!(e.contains(&format!("{missing} is not")), "{missing}: {e}");
        }
        let with = |k: &str, v: &'static str| -> String {
            let pairs: Vec<_> = TORCH
                .iter()
                .map(|&(a, b)| if a == k { (a, v) } else { (a, b) })
                .collect();
            err(&pairs)
        };
        assert!(with("RANK", "x").contains("RANK=\"x\""));
        assert!(with("RANK", "-1").contains("RANK=\"-1\""));
        assert!(with("RANK", "8").contains("RANK=8 is not below WORLD_SIZE=8"));
        assert!(with("LOCAL_RANK", "2").contains("LOCAL_RANK=2"));
        assert!(with("LOCAL_WORLD_SIZE", "9").contains("LOCAL_WORLD_SIZE"));
        assert!(with("WORLD_SIZE", "0").contains("WORLD_SIZE=0"));
        assert!(with("MASTER_PORT", "70000").contains("MASTER_PORT=\"70000\""));
        assert!(with("MASTER_PORT", "0").contains("MASTER_PORT"));
    }

    #[test]
    fn slurm_vars() {
        let base = [
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "11"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NODEID", "1"),
            ("SLURM_TASKS_PER_NODE", "4(x2),3"),
            ("SLURM_JOB_NODELIST", "gpu[03-05],login1"),
            ("SLURM_STEP_NODELIST", "gpu[04-05],login1"),
            ("SLURM_JOB_ID", "1234567"),
        ];
        let w = env(&base).unwrap().unwrap();
        assert_eq!(
            w,
            WorldEnv {
                rank: 5,
                world_size: 11,
                local_rank: 1,
                local_world_size: 4,
                master_addr: "gpu04".into(), // the step's first node, not the job's
                master_port: 15000 + 4567,
                source: Launcher::Slurm,
            }
        );
        // The third node has 3 tasks.
        let mut third = base.to_vec();
        third[3] = ("SLURM_NODEID", "2");
        assert_eq!(env(&third).unwrap().unwrap().local_world_size, 3);
        // Job node list when no step list; MASTER_PORT / MASTER_ADDR override.
        let mut job: Vec<_> = base
            .iter()
            .copied()
            .filter(|(k, _)| *k != "SLURM_STEP_NODELIST")
            .collect();
        assert_eq!(env(&job).unwrap().unwrap().master_addr, "gpu03");
        job.extend([("MASTER_PORT", "12345"), ("MASTER_ADDR", "10.0.0.1")]);
        let w = env(&job).unwrap().unwrap();
        assert_eq!((w.master_addr.as_str(), w.master_port), ("10.0.0.1", 12345));
        // A short job id gives 15000 + the id.
        let mut short = base.to_vec();
        short[7] = ("SLURM_JOB_ID", "42");
        assert_eq!(env(&short).unwrap().unwrap().master_port, 15042);
        // --ntasks-per-node wins over the compressed form.
        let mut per = base.to_vec();
        per.push(("SLURM_NTASKS_PER_NODE", "2"));
        per[1] = ("SLURM_NTASKS", "6");
        per[0] = ("SLURM_PROCID", "3");
        assert_eq!(env(&per).unwrap().unwrap().local_world_size, 2);
    }

    #[test]
    fn slurm_bad_is_named() {
        let base = [
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_TASKS_PER_NODE", "2"),
            ("SLURM_JOB_NODELIST", "n1"),
            ("SLURM_JOB_ID", "77"),
        ];
        assert_eq!(env(&base).unwrap().unwrap().master_addr, "n1");
        let without = |k: &str| -> String {
            err(&base
                .iter()
                .copied()
                .filter(|(a, _)| *a != k)
                .collect::<Vec<_>>())
        };
        assert!(without("SLURM_NTASKS").contains("SLURM_NTASKS is not"));
        assert!(without("SLURM_LOCALID").contains("SLURM_LOCALID is not"));
        assert!(without("SLURM_JOB_NODELIST").contains("MASTER_ADDR"));
        assert!(without("SLURM_JOB_ID").contains("MASTER_PORT"));
        let with = |k: &'static str, v: &'static str| -> String {
            let mut p = base.to_vec();
            p.retain(|(a, _)| *a != k);
            p.push((k, v));
            err(&p)
        };
        assert!(with("SLURM_PROCID", "2").contains("SLURM_PROCID=2 is not below SLURM_NTASKS=2"));
        assert!(with("SLURM_NTASKS", "two").contains("SLURM_NTASKS=\"two\""));
        assert!(with("SLURM_JOB_NODELIST", "n[1-").contains("SLURM_JOB_NODELIST"));
        assert!(with("SLURM_TASKS_PER_NODE", "2(x").contains("SLURM_TASKS_PER_NODE"));
        assert!(with("SLURM_TASKS_PER_NODE", "2,1").contains("SLURM_NODEID"));
        assert!(with("SLURM_JOB_ID", "abc").contains("SLURM_JOB_ID"));
    }

    #[test]
    fn open_mpi_vars() {
        let one_node = [
            ("OMPI_COMM_WORLD_RANK", "2"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "2"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "4"),
        ];
        assert_eq!(
            env(&one_node).unwrap().unwrap(),
            WorldEnv {
                rank: 2,
                world_size: 4,
                local_rank: 2,
                local_world_size: 4,
                master_addr: "127.0.0.1".into(),
                master_port: DEFAULT_MASTER_PORT,
                source: Launcher::OpenMpi,
            }
        );
        let mut two_nodes = one_node.to_vec();
        two_nodes[3] = ("OMPI_COMM_WORLD_LOCAL_SIZE", "2");
        two_nodes[2] = ("OMPI_COMM_WORLD_LOCAL_RANK", "0");
        assert!(err(&two_nodes).contains("MASTER_ADDR is not set"));
        two_nodes.extend([("MASTER_ADDR", "head"), ("MASTER_PORT", "4000")]);
        let w = env(&two_nodes).unwrap().unwrap();
        assert_eq!((w.master_addr.as_str(), w.master_port), ("head", 4000));
        let partial = &one_node[..2];
        assert!(err(partial).contains("OMPI_COMM_WORLD_LOCAL_RANK is not"));
        let mut bad = one_node.to_vec();
        bad[0] = ("OMPI_COMM_WORLD_RANK", "4");
        assert!(err(&bad).contains("OMPI_COMM_WORLD_RANK=4 is not below OMPI_COMM_WORLD_SIZE=4"));
    }

    fn hosts(s: &str) -> Vec<String> {
        expand_nodelist(s).unwrap()
    }

    #[test]
    fn nodelist_expansion() {
        assert_eq!(hosts("login1"), ["login1"]);
        assert_eq!(hosts("a,b"), ["a", "b"]);
        assert_eq!(
            hosts("gpu[03-05,11],login1"),
            ["gpu03", "gpu04", "gpu05", "gpu11", "login1"]
        );
        assert_eq!(
            hosts("n[8-10]"),
            ["n8", "n9", "n10"],
            "no padding without a leading 0"
        );
        assert_eq!(
            hosts("n[08-10]"),
            ["n08", "n09", "n10"],
            "padding kept past 9"
        );
        assert_eq!(hosts("n[0-1]"), ["n0", "n1"]);
        assert_eq!(hosts("n[007]"), ["n007"]);
        assert_eq!(
            hosts("r[1-2]-n[01-02]"),
            ["r1-n01", "r1-n02", "r2-n01", "r2-n02"]
        );
        assert_eq!(hosts("a[1,3]b,c[9-10]x"), ["a1b", "a3b", "c9x", "c10x"]);
        assert_eq!(hosts(" x[1] "), ["x1"]);
    }

    #[test]
    fn nodelist_malformed() {
        for bad in [
            "",
            "n[1-3",
            "n1-3]",
            "n[[1]]",
            "n[]",
            "n[3-1]",
            "n[a-b]",
            "n[1-]",
            "n[-2]",
            "a,,b",
            "a,",
            "n[1,]",
            "n[0-99999999999]",
        ] {
            assert!(expand_nodelist(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn tasks_per_node_expansion() {
        assert_eq!(expand_tasks_per_node("4(x2),3").unwrap(), [4, 4, 3]);
        assert_eq!(expand_tasks_per_node("8").unwrap(), [8]);
        for bad in ["", "4(x)", "4(2)", "x", "4(x2", "4,,3"] {
            assert!(expand_tasks_per_node(bad).is_err(), "{bad:?} accepted");
        }
    }
}
