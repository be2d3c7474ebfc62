//! weft: a container overlay network for Linux hosts, the successor to Weave Net.
//!
//! One agent per host; the subsystems are modules with a pure core and a thin I/O
//! shell (see DESIGN.md):
//! - [`datapath`]: the kernel data path (eBPF TC programs + VXLAN) behind a trait.
//! - [`mesh`]: peers, encrypted connections, topology gossip, gossip channels.
//! - [`endpoints`]: the gossiped endpoint table and the data-path programmer.
//! - [`ipam`]: distributed address allocation; [`dns`]: the gossiped name table
//!   and its DNS server; [`attach`]: an endpoint with addresses and names.
//! - [`docker`]: the Docker event watcher and API proxy.
//! - [`api`]: the local HTTP API, status text and metrics; [`cli`] and the binary.
//! - [`state`]: the state directory; [`lock`]: one agent per host; [`config`]:
//!   the launch flags checked; [`task`]: owned background tasks; [`app`] wires
//!   everything.

pub mod accept;
pub mod api;
pub mod app;
pub mod attach;
pub mod cli;
pub mod config;
pub mod datapath;
pub mod discovery;
pub mod docker;
pub mod dns;
pub mod endpoints;
pub mod ipam;
pub mod lock;
pub mod mesh;
pub mod state;
pub mod task;
