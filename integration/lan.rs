//! Scenarios on a real office LAN built on this machine: network-namespace
//! hosts, each with its own `/nix` and nix-daemon, running real Nix clients
//! and real agents (see harness.rs). Needs root.

mod harness;
mod scenario_lan;
mod scenario_store;
