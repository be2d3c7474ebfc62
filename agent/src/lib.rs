//! weft: a container overlay network for Linux hosts, the successor to Weave Net.
//!
//! One agent per host; the subsystems are modules with a pure core and a thin I/O
//! shell (see DESIGN.md):
//! - [`datapath`]: the kernel data path (eBPF TC programs + VXLAN) behind a trait.
//! - [`mesh`]: peers, encrypted connections, topology gossip, gossip channels.

pub mod datapath;
pub mod mesh;
