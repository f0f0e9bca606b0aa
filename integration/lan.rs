//! Scenarios on a real office LAN built on this machine: network-namespace
//! hosts, each with its own `/nix` and nix-daemon, running real Nix clients
//! and real agents (see harness.rs). Needs root.

mod harness;
mod office;
mod scenario_avahi;
mod scenario_bulk;
mod scenario_failover;
mod scenario_fault_campaign;
mod scenario_floods;
mod scenario_journaled_fs;
mod scenario_jumbo;
mod scenario_lan;
mod scenario_mesh;
mod scenario_office_scale;
mod scenario_plain_caches;
mod scenario_pull_through;
mod scenario_slow_lan;
mod scenario_store;
mod scenario_stripes;
mod scenario_substitute;
mod scenario_uplink;
