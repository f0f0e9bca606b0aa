//! Packs the missing zstd frames of a NAR while this host is idle. A serve
//! keeps the frames it packs with zstd, but on a fast link the pace sends
//! many chunks as LZ4 or raw to keep up, and those get no kept frame: the
//! next asker of the same NAR (the rest of an office fetching the same new
//! closure) would have them packed again, or sent larger. When a serve
//! finds that a NAR compresses and that some of its chunks have no kept
//! frame, it asks for them here; one thread at the scheduler's idle
//! priority packs them a chunk at a time, only once no peer has been
//! served for `QUIET`, within the kept frames' budget (a NAR stops at the
//! first chunk that finds no room), and at a tighter level than serves
//! pack at (`FILL_LEVEL`). Then every chunk can go as a kept frame:
//! nothing to pack on this host, and a smaller chunk on the wire.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::lock::lock;
use crate::mesh::nar_chunks::{self, Codec, Packer};
use crate::nix::PathInfo;
use crate::store::nar_stream::{self, Check};
use crate::store::packed_frames::{FramesKey, PackedFrames, Put};
use crate::store::shared::SharedStore;

/// How long no peer must have been served before a chunk is packed.
const QUIET: Duration = Duration::from_secs(1);
/// A NAR whose filling waited this long for a quiet moment is left for
/// its next serve to ask again.
const GIVE_UP: Duration = Duration::from_secs(120);
/// A NAR filled this recently is not looked at again (its chunks that did
/// not compress would be packed again for nothing).
const AGAIN: Duration = Duration::from_secs(600);
/// NARs waiting to be filled; more are dropped (their next serve asks
/// again).
const QUEUE: usize = 64;
/// NARs remembered as filled recently.
const REMEMBERED: usize = 256;
/// The zstd level frames are filled in at, where the asker's is lower.
/// Packing waits for an idle CPU, so it can afford a tighter level: on
/// 256 KiB chunks of this machine's binaries level 6 leaves 10 % fewer
/// bytes than level 1 at a quarter of its speed (126 against 451 MB/s),
/// and unpacks as fast (about 1.4 GB/s); any zstd frame reads the same.
const FILL_LEVEL: u8 = 6;

struct Job {
    info: PathInfo,
    level: u8,
    key: FramesKey,
}

pub struct FillStats {
    /// Frames packed and kept here.
    pub filled: Counter,
    /// NARs waiting or being filled.
    pub pending: Gauge,
}

impl FillStats {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "nixmesh_packed_chunks_filled",
            "zstd frames of NAR chunks packed and kept while idle",
            self.filled.clone(),
        );
        registry.register(
            "nixmesh_packed_fill_pending",
            "NARs whose missing zstd frames wait to be packed while idle",
            self.pending.clone(),
        );
    }
}

struct State {
    /// Milliseconds from `epoch` to the last chunk served to a peer.
    busy: AtomicU64,
    epoch: Instant,
    queued: Mutex<HashSet<FramesKey>>,
    filled: Mutex<HashMap<FramesKey, Instant>>,
    stats: FillStats,
}

impl State {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

pub struct FrameFiller {
    jobs: SyncSender<Job>,
    state: Arc<State>,
}

impl FrameFiller {
    /// Starts the filling thread; it ends when this is dropped or at
    /// `shutdown`.
    pub fn start(
        shared: Arc<SharedStore>,
        frames: Arc<PackedFrames>,
        shutdown: CancellationToken,
    ) -> std::io::Result<Self> {
        let (jobs, rx) = sync_channel(QUEUE);
        let state = Arc::new(State {
            busy: AtomicU64::new(0),
            epoch: Instant::now(),
            queued: Mutex::new(HashSet::new()),
            filled: Mutex::new(HashMap::new()),
            stats: FillStats {
                filled: Counter::default(),
                pending: Gauge::default(),
            },
        });
        let filler = Filler {
            shared,
            frames,
            runtime: tokio::runtime::Handle::current(),
            state: state.clone(),
            shutdown,
        };
        std::thread::Builder::new()
            .name("frame-filler".into())
            .spawn(move || filler.run(rx))?;
        Ok(Self { jobs, state })
    }

    pub fn stats(&self) -> &FillStats {
        &self.state.stats
    }

    /// A chunk of a NAR is being served to a peer: not a quiet moment.
    pub fn busy(&self) {
        self.state.busy.store(self.state.now(), Ordering::Relaxed);
    }

    /// Asks for the missing frames of `info`'s NAR at zstd `level`.
    pub fn ask(&self, info: &PathInfo, level: u8) {
        let Some(key) = FramesKey::of(info, level) else {
            return;
        };
        let recent = lock(&self.state.filled)
            .get(&key)
            .is_some_and(|at| at.elapsed() < AGAIN);
        if recent || !lock(&self.state.queued).insert(key.clone()) {
            return;
        }
        let job = Job {
            info: info.clone(),
            level,
            key: key.clone(),
        };
        match self.jobs.try_send(job) {
            Ok(()) => {
                self.state.stats.pending.inc();
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                lock(&self.state.queued).remove(&key);
            }
        }
    }
}

/// The filling thread's side.
struct Filler {
    shared: Arc<SharedStore>,
    frames: Arc<PackedFrames>,
    runtime: tokio::runtime::Handle,
    state: Arc<State>,
    shutdown: CancellationToken,
}

/// How one NAR's filling ended.
#[derive(Debug)]
enum Filled {
    /// Every missing chunk was packed (those that shrank are kept).
    Done,
    /// The budget or the disk had no room for more.
    NoRoom,
    /// No quiet moment came, or the agent is stopping.
    Busy,
    /// The store could not give the NAR's bytes (logged).
    Unreadable,
}

impl Filler {
    fn run(self, jobs: Receiver<Job>) {
        idle_priority();
        while let Ok(job) = jobs.recv() {
            if self.shutdown.is_cancelled() {
                break;
            }
            let before = self.state.stats.filled.get();
            let outcome = self.fill(&job);
            let kept = self.state.stats.filled.get() - before;
            tracing::debug!(path = %job.info.path, level = job.level, kept, ?outcome, "filled in kept zstd frames");
            // Left for want of a quiet moment: the next serve asks again.
            if !matches!(outcome, Filled::Busy) {
                let mut filled = lock(&self.state.filled);
                if filled.len() >= REMEMBERED {
                    filled.retain(|_, at| at.elapsed() < AGAIN);
                }
                if filled.len() < REMEMBERED {
                    filled.insert(job.key.clone(), Instant::now());
                }
            }
            lock(&self.state.queued).remove(&job.key);
            self.state.stats.pending.dec();
        }
    }

    fn fill(&self, job: &Job) -> Filled {
        let chunk = nar_chunks::CHUNK as u64;
        let slots = job.info.nar_size.div_ceil(chunk);
        let missing = self.frames.missing(&job.key, slots);
        let mut packer = Packer::new(job.level.max(FILL_LEVEL));
        for run in runs(&missing) {
            let (start, end) = (run.start * chunk, (run.end * chunk).min(job.info.nar_size));
            if !self.quiet_moment() {
                return Filled::Busy;
            }
            let stream = {
                let _in_runtime = self.runtime.enter();
                nar_stream::spawn(
                    self.shared.store().clone(),
                    None,
                    job.info.clone(),
                    start,
                    Check::Size,
                )
            };
            let mut rx = stream.into_receiver();
            let mut pending = BytesMut::with_capacity(nar_chunks::CHUNK);
            let mut at = start;
            while at < end {
                while pending.len() < nar_chunks::CHUNK && at + (pending.len() as u64) < end {
                    match rx.blocking_recv() {
                        Some(Ok(bytes)) => pending.extend_from_slice(&bytes),
                        Some(Err(e)) => {
                            tracing::debug!(path = %job.info.path, error = %e, "frame filler: cannot read the NAR");
                            return Filled::Unreadable;
                        }
                        None => return Filled::Unreadable,
                    }
                }
                let n = pending.len().min(nar_chunks::CHUNK);
                let raw = pending.split_to(n);
                if !self.quiet_moment() {
                    return Filled::Busy;
                }
                let frame = packer.pack_with(&raw, Some(Codec::Zstd));
                if let Some(zstd) = nar_chunks::zstd_payload(&frame, false) {
                    match self.frames.put(&job.key, at / chunk, &raw, zstd) {
                        Put::Kept => {
                            self.state.stats.filled.inc();
                        }
                        Put::NoRoom => return Filled::NoRoom,
                        Put::Had | Put::Unfit => {}
                    }
                }
                at += n as u64;
            }
        }
        Filled::Done
    }

    /// Waits until no peer has been served for `QUIET`; `false` if the
    /// agent stops or none comes within `GIVE_UP`.
    fn quiet_moment(&self) -> bool {
        let began = Instant::now();
        loop {
            if self.shutdown.is_cancelled() || began.elapsed() > GIVE_UP {
                return false;
            }
            let since = self
                .state
                .now()
                .saturating_sub(self.state.busy.load(Ordering::Relaxed));
            let quiet = QUIET.as_millis() as u64;
            if since >= quiet {
                return true;
            }
            std::thread::sleep(Duration::from_millis((quiet - since).min(100)));
        }
    }
}

/// The missing slots as runs of consecutive slots, in order. Pure.
fn runs(missing: &[u64]) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for &slot in missing {
        match out.last_mut() {
            Some(run) if run.end == slot => run.end += 1,
            _ => out.push(slot..slot + 1),
        }
    }
    out
}

/// This thread runs only when no other wants the CPU (`SCHED_IDLE`).
#[allow(unsafe_code)] // sched_setscheduler(2): no safe wrapper in the dependencies.
fn idle_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid
    // `sched_param` that outlives the call.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "frame filler: cannot lower its priority");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_slots_group_into_runs() {
        assert_eq!(runs(&[]), Vec::<Range<u64>>::new());
        assert_eq!(runs(&[0, 1, 2]), vec![0..3]);
        assert_eq!(runs(&[1, 3, 4, 7]), vec![1..2, 3..5, 7..8]);
    }
}
