//! The commands that look at a running agent or this host's setup:
//! `nixmesh peers`, `status`, `why` (through the admin API) and `doctor`.

pub mod admin_client;
pub mod doctor;
pub mod render;
