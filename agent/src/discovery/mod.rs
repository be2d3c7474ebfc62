//! Peer sources beyond the command line: today the AWS Auto Scaling group
//! (feature `aws`, `--discovery aws-asg`).
//!
//! A [`Source`] answers "which hosts belong with this one now?". [`run`] asks
//! it periodically and keeps the mesh in line: new hosts become targets, hosts
//! the source no longer lists are forgotten (only those it added: peers given on
//! the command line stay), and IPAM learns the current set, so a host that is
//! gone for good (terminated) can have its address space reclaimed while one
//! that is merely unreachable keeps it. A failing source (no metadata service,
//! no credentials, throttling, 5xx) is logged with what to do, retried with
//! backoff, and changes nothing: the agent keeps the peers it has.
//!
//! Owns: nothing but its last answer. Uses: the mesh handle, the IPAM watch.

#[cfg(feature = "aws")]
pub mod aws;
#[cfg(feature = "aws")]
pub mod ec2;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::ipam::Discovered;
use crate::mesh::MeshHandle;
use crate::task::Task;

/// What a source found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Found {
    /// This host's own address in the group, if the source knows it (left out
    /// of the targets).
    pub me: Option<Ipv4Addr>,
    /// Every member's address (this host's included).
    pub members: BTreeSet<Ipv4Addr>,
    /// How the members were chosen, for the log ("Auto Scaling group web-asg").
    pub group: String,
    /// How many instances the group is meant to have (the Auto Scaling
    /// groups' desired capacity), when the source knows; 0 if not.
    pub desired: usize,
}

impl Found {
    /// The group's size for IPAM's first agreement: its members with this
    /// host (which may not be InService yet), or the desired capacity if that
    /// is larger (instances still booting will join).
    pub fn group_size(&self) -> usize {
        let me_extra = self.me.is_some_and(|me| !self.members.contains(&me));
        (self.members.len() + usize::from(me_extra)).max(self.desired)
    }

    /// What IPAM learns from this answer.
    pub fn for_ipam(&self) -> Discovered {
        Discovered { members: self.members.clone(), group_size: self.group_size() }
    }
}

/// Why a source could not answer; the message says what to do.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct SourceError(pub String);

/// A peer source.
#[async_trait::async_trait]
pub trait Source: Send + Sync {
    async fn discover(&self) -> Result<Found, SourceError>;
}

/// The sources `--discovery` can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// Only the peers given on the command line and learned over the mesh.
    None,
    /// The instance's EC2 Auto Scaling group (or its `weave:peerGroupName` tag,
    /// or the groups tagged with its ECS cluster).
    AwsAsg,
}

/// The longest wait between attempts after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Starts asking `source` every `interval` (after a failure: 1 s, doubling up
/// to `interval` or 5 minutes) and applying the answer. A failing source never
/// ends the task: it keeps the peers it has and retries.
pub fn spawn(
    source: Box<dyn Source>,
    mesh: MeshHandle,
    given: BTreeSet<Ipv4Addr>,
    ipam_view: watch::Sender<Option<Discovered>>,
    interval: Duration,
) -> Task<SourceError> {
    Task::spawn("discovery", tracing::info_span!("discovery"), CancellationToken::new(), move |cancel| async move {
        run(source, mesh, given, ipam_view, interval, cancel).await;
        Ok(())
    })
}

async fn run(
    source: Box<dyn Source>,
    mesh: MeshHandle,
    given: BTreeSet<Ipv4Addr>,
    ipam_view: watch::Sender<Option<Discovered>>,
    interval: Duration,
    cancel: CancellationToken,
) {
    let mut added: BTreeSet<Ipv4Addr> = BTreeSet::new();
    let mut backoff = Duration::from_secs(1);
    let mut failures = 0u32;
    loop {
        let wait = match source.discover().await {
            Ok(found) => {
                if failures > 0 {
                    info!(failures, "discovery: answering again");
                }
                failures = 0;
                backoff = Duration::from_secs(1);
                apply(&found, &given, &mut added, &mesh).await;
                let mut view = found.for_ipam();
                // Peers given outside the group vote too.
                view.group_size += given.iter().filter(|a| !found.members.contains(a) && Some(**a) != found.me).count();
                ipam_view.send_replace(Some(view));
                interval
            }
            Err(e) => {
                failures += 1;
                warn!(
                    error = %e,
                    attempt = failures,
                    retry_in = ?backoff,
                    peers = added.len(),
                    "discovery failed; keeping the peers weft has and retrying"
                );
                let wait = backoff;
                backoff = (backoff * 2).min(interval.max(Duration::from_secs(1))).min(MAX_BACKOFF);
                wait
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Connects to new members, forgets the ones this source added that left.
/// Peers given on the command line (`given`) are the user's: never forgotten.
async fn apply(found: &Found, given: &BTreeSet<Ipv4Addr>, added: &mut BTreeSet<Ipv4Addr>, mesh: &MeshHandle) {
    let want = targets(found, given);
    let (join, leave) = diff(added, &want);
    if !join.is_empty() {
        info!(group = %found.group, peers = ?join, "discovery: new peers");
        if mesh.connect(join.iter().map(ToString::to_string).collect(), false).await.is_err() {
            return;
        }
    }
    if !leave.is_empty() {
        info!(group = %found.group, peers = ?leave, "discovery: peers left the group; forgetting them");
        if mesh.forget(leave.iter().map(ToString::to_string).collect()).await.is_err() {
            return;
        }
    }
    *added = want;
}

/// The members this source manages as targets: not this host, not a peer the
/// user gave.
fn targets(found: &Found, given: &BTreeSet<Ipv4Addr>) -> BTreeSet<Ipv4Addr> {
    found.members.iter().copied().filter(|a| Some(*a) != found.me && !given.contains(a)).collect()
}

/// What to add and what to drop to go from `have` to `want`.
fn diff(have: &BTreeSet<Ipv4Addr>, want: &BTreeSet<Ipv4Addr>) -> (Vec<Ipv4Addr>, Vec<Ipv4Addr>) {
    (want.difference(have).copied().collect(), have.difference(want).copied().collect())
}

/// A source this build of weft does not have.
#[derive(Debug, Clone, thiserror::Error)]
#[error("--discovery {kind}: this weft was built without AWS support; use a release built with `cargo build --release --features aws`")]
pub struct Unavailable {
    pub kind: &'static str,
}

/// Whether this build has the source `kind` names.
pub fn available(kind: Kind) -> Result<(), Unavailable> {
    match kind {
        Kind::None => Ok(()),
        #[cfg(feature = "aws")]
        Kind::AwsAsg => Ok(()),
        #[cfg(not(feature = "aws"))]
        Kind::AwsAsg => Err(Unavailable { kind: "aws-asg" }),
    }
}

/// The source `kind` names, from the launch settings (checked with
/// [`available`] first).
pub fn source(kind: Kind, settings: &Settings) -> Result<Option<Box<dyn Source>>, Unavailable> {
    available(kind)?;
    match kind {
        Kind::None => Ok(None),
        #[cfg(feature = "aws")]
        Kind::AwsAsg => Ok(Some(Box::new(aws::AwsSource::new(settings.clone())))),
        #[cfg(not(feature = "aws"))]
        Kind::AwsAsg => {
            let _ = settings;
            Err(Unavailable { kind: "aws-asg" })
        }
    }
}

/// Settings of the sources.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// Instances carrying this tag (with the same value as this instance) are
    /// one group, across Auto Scaling groups (Weave's `weave:peerGroupName`).
    pub peer_group_tag: String,
    /// The ECS cluster: the Auto Scaling groups tagged `weft:ecs-cluster` with
    /// it are one group. Empty: read ECS_CLUSTER from /etc/ecs/ecs.config.
    pub ecs_cluster: Option<String>,
}

/// ECS_CLUSTER from an ecs.config text (what the ECS agent reads).
pub fn ecs_cluster_from_config(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("ECS_CLUSTER="))
        .map(|v| v.trim().trim_matches('"').to_string())
        .find(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(addrs: &[[u8; 4]]) -> BTreeSet<Ipv4Addr> {
        addrs.iter().map(|a| Ipv4Addr::from(*a)).collect()
    }

    #[test]
    fn diff_adds_and_drops() {
        let (join, leave) = diff(&set(&[[10, 0, 0, 1], [10, 0, 0, 2]]), &set(&[[10, 0, 0, 2], [10, 0, 0, 3]]));
        assert_eq!(join, vec![Ipv4Addr::new(10, 0, 0, 3)]);
        assert_eq!(leave, vec![Ipv4Addr::new(10, 0, 0, 1)]);
    }

    #[test]
    fn neither_this_host_nor_a_given_peer_is_managed() {
        let found = Found { me: Some([10, 0, 0, 1].into()), members: set(&[[10, 0, 0, 1], [10, 0, 0, 2], [10, 0, 0, 3]]), group: "g".into(), desired: 0 };
        let given = set(&[[10, 0, 0, 3]]);
        assert_eq!(targets(&found, &given), set(&[[10, 0, 0, 2]]));
        // A given peer that leaves the group is not in `added`, so never forgotten.
        let (_, leave) = diff(&targets(&found, &given), &BTreeSet::new());
        assert_eq!(leave, vec![Ipv4Addr::new(10, 0, 0, 2)]);
    }

    #[test]
    fn the_group_size_counts_this_host_and_instances_still_booting() {
        let members = set(&[[10, 0, 0, 2], [10, 0, 0, 3]]);
        let found = |me: [u8; 4], desired| Found { me: Some(me.into()), members: members.clone(), group: "g".into(), desired };
        assert_eq!(found([10, 0, 0, 2], 0).group_size(), 2, "this host among the members");
        assert_eq!(found([10, 0, 0, 9], 0).group_size(), 3, "this host not InService yet");
        assert_eq!(found([10, 0, 0, 2], 5).group_size(), 5, "three more are booting");
        assert_eq!(found([10, 0, 0, 2], 1).group_size(), 2, "desired capacity already lowered");
        assert_eq!(Found::default().group_size(), 0, "nothing known: nothing decided");
    }

    #[test]
    fn the_ecs_cluster_is_read_like_the_ecs_agent_does() {
        assert_eq!(ecs_cluster_from_config("ECS_LOGLEVEL=info\nECS_CLUSTER=weft-demo\n").as_deref(), Some("weft-demo"));
        assert_eq!(ecs_cluster_from_config("ECS_CLUSTER=\"quoted\"").as_deref(), Some("quoted"));
        assert_eq!(ecs_cluster_from_config("ECS_CLUSTER=\n# nothing"), None);
    }
}
