//! Packs the missing zstd frames of a NAR while this host is idle. A serve
//! keeps the frames it packs with zstd, but on a fast link the pace sends
//! many chunks as LZ4 or raw to keep up, and those get no kept frame: the
//! next asker of the same NAR (the rest of an office fetching the same new
//! closure) would have them packed again, or sent larger. When a serve
//! finds that a NAR compresses and that some of its chunks have no kept
//! frame, it asks for them here. One thread packs them a chunk at a time
//! at the scheduler's idle priority, and only while no peer has been
//! served for `QUIET` (a serve that comes in between stops the reading,
//! which starts again at the next missing chunk once it is quiet). The
//! whole NAR is filled, whichever part was served (the next asker may
//! stripe it otherwise), within the kept frames' budget (a NAR stops at
//! the first chunk that finds no room), and at a tighter level than
//! serves pack at (`FILL_LEVEL`). Then every chunk that compresses can go
//! as a kept frame to an asker whose link packing pays on: nothing to
//! pack on this host, and a smaller chunk on the wire.
//!
//! Only the packing runs at idle priority: the NAR's bytes are read on
//! the runtime's blocking pool as for a serve, and the kept frames' books
//! are only touched from there, so that a thread the scheduler starves
//! never holds a lock a serve waits for.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc::Receiver as ChunkReceiver;
use tokio_util::sync::CancellationToken;

use crate::mesh::nar_chunks::{self, Codec, Packer};
use crate::nix::PathInfo;
use crate::store::nar_stream::{self, Check, NarStreamError};
use crate::store::packed_frames::{FramesKey, PackedFrames, Put};
use crate::store::shared::SharedStore;

/// How long no peer must have been served before a chunk is packed.
const QUIET: Duration = Duration::from_secs(1);
/// A NAR whose filling has not ended this long after it began (no quiet
/// moment came) is left for its next serve to ask again.
const GIVE_UP: Duration = Duration::from_secs(120);
/// A NAR filled this recently is not looked at again (its chunks that did
/// not compress would be packed again for nothing).
const AGAIN: Duration = Duration::from_secs(600);
/// Asks waiting; more are dropped (the NAR's next serve asks again).
const QUEUE: usize = 64;
/// NARs remembered as filled recently.
const REMEMBERED: usize = 256;
/// How often the thread waiting for work looks at the shutdown token.
const WAKE: Duration = Duration::from_secs(1);
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
    /// Asks waiting or being worked on.
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

/// What serves and the filling thread share: lock-free.
struct State {
    /// Milliseconds from `epoch` to the last chunk served to a peer.
    busy: AtomicU64,
    epoch: Instant,
    stats: FillStats,
}

impl State {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Milliseconds since a chunk was last served to a peer.
    fn idle_for(&self) -> u64 {
        self.now().saturating_sub(self.busy.load(Ordering::Relaxed))
    }
}

pub struct FrameFiller {
    /// `None` wakes the thread to see the shutdown.
    jobs: SyncSender<Option<Job>>,
    state: Arc<State>,
    thread: std::thread::JoinHandle<()>,
}

impl FrameFiller {
    /// Starts the filling thread; it ends at `shutdown` (told by `stop`,
    /// or within `WAKE`; and within a chunk) or when this is dropped.
    pub fn start(
        shared: Arc<SharedStore>,
        frames: Arc<PackedFrames>,
        shutdown: CancellationToken,
    ) -> std::io::Result<Self> {
        let (jobs, rx) = sync_channel(QUEUE);
        let state = Arc::new(State {
            busy: AtomicU64::new(0),
            epoch: Instant::now(),
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
            filled: HashMap::new(),
        };
        let thread = std::thread::Builder::new()
            .name("frame-filler".into())
            .spawn(move || filler.run(rx))?;
        Ok(Self {
            jobs,
            state,
            thread,
        })
    }

    pub fn stats(&self) -> &FillStats {
        &self.state.stats
    }

    /// A chunk of a NAR is being served to a peer: not a quiet moment.
    pub fn busy(&self) {
        self.state.busy.store(self.state.now(), Ordering::Relaxed);
    }

    /// Asks for the missing frames of `info`'s NAR at zstd `level`. Never
    /// blocks.
    pub fn ask(&self, info: &PathInfo, level: u8) {
        let Some(key) = FramesKey::of(info, level) else {
            return;
        };
        let job = Job {
            info: info.clone(),
            level,
            key,
        };
        // Counted before the thread can take it.
        self.state.stats.pending.inc();
        if self.jobs.try_send(Some(job)).is_err() {
            self.state.stats.pending.dec();
        }
    }

    /// Wakes the thread to see the shutdown, and waits up to `limit` for it
    /// to end; `false` if it did not.
    pub async fn stopped(&self, limit: Duration) -> bool {
        // A full queue: the thread is at work, and sees the shutdown
        // between jobs.
        let _ = self.jobs.try_send(None);
        let ended = async {
            while !self.thread.is_finished() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(limit, ended).await.is_ok()
    }
}

/// The filling thread's side.
struct Filler {
    shared: Arc<SharedStore>,
    frames: Arc<PackedFrames>,
    runtime: tokio::runtime::Handle,
    state: Arc<State>,
    shutdown: CancellationToken,
    /// When each NAR was last filled; only this thread touches it.
    filled: HashMap<FramesKey, Instant>,
}

/// How one NAR's filling ended.
#[derive(Debug)]
enum Filled {
    /// Every missing chunk was packed (those that shrank are kept).
    Done,
    /// The budget or the disk had no room for more.
    NoRoom,
    /// No quiet moment came in time, or the agent is stopping.
    Busy,
    /// The store could not give the NAR's bytes (logged).
    Unreadable,
}

/// How a pass over the missing chunks ended.
enum Pass {
    Ended(Filled),
    /// A peer was served: the reading stopped, to go on once it is quiet.
    Interrupted,
}

impl Filler {
    fn run(mut self, jobs: Receiver<Option<Job>>) {
        idle_priority();
        loop {
            let job = match jobs.recv_timeout(WAKE) {
                Ok(Some(job)) => job,
                Ok(None) | Err(RecvTimeoutError::Timeout) if !self.shutdown.is_cancelled() => {
                    continue
                }
                Ok(None) | Err(_) => break,
            };
            let recent = self
                .filled
                .get(&job.key)
                .is_some_and(|at| at.elapsed() < AGAIN);
            if !recent && !self.shutdown.is_cancelled() {
                let before = self.state.stats.filled.get();
                let outcome = self.fill(&job);
                let kept = self.state.stats.filled.get() - before;
                tracing::debug!(path = %job.info.path, level = job.level, kept, ?outcome, "filled in kept zstd frames");
                // Left for want of a quiet moment: the next serve asks
                // again.
                if !matches!(outcome, Filled::Busy) {
                    self.remember(job.key);
                }
            }
            self.state.stats.pending.dec();
        }
    }

    fn remember(&mut self, key: FramesKey) {
        if self.filled.len() >= REMEMBERED {
            self.filled.retain(|_, at| at.elapsed() < AGAIN);
        }
        if self.filled.len() < REMEMBERED {
            self.filled.insert(key, Instant::now());
        }
    }

    fn fill(&self, job: &Job) -> Filled {
        let began = Instant::now();
        let mut packer = Packer::new(job.level.max(FILL_LEVEL));
        loop {
            if !self.quiet_moment(began) {
                return Filled::Busy;
            }
            let missing = {
                let (frames, key) = (self.frames.clone(), job.key.clone());
                let slots = job.info.nar_size.div_ceil(nar_chunks::CHUNK as u64);
                self.on_pool(move || frames.missing(&key, slots))
            };
            let Some(missing) = missing else {
                return Filled::Busy;
            };
            match self.pass(job, &missing, &mut packer) {
                Pass::Ended(filled) => return filled,
                Pass::Interrupted => continue,
            }
        }
    }

    /// Packs and keeps the chunks of the `missing` slots, in runs of
    /// consecutive slots, one NAR stream each.
    fn pass(&self, job: &Job, missing: &[u64], packer: &mut Packer) -> Pass {
        let chunk = nar_chunks::CHUNK as u64;
        for run in runs(missing) {
            let (start, end) = (run.start * chunk, (run.end * chunk).min(job.info.nar_size));
            let rx = {
                let _in_runtime = self.runtime.enter();
                nar_stream::spawn(
                    self.shared.store().clone(),
                    None,
                    Some(self.shared.layouts().clone()),
                    job.info.clone(),
                    start,
                    Check::Size,
                )
                .into_receiver()
            };
            let mut reader = ChunkReader {
                rx,
                pending: BytesMut::new(),
            };
            let mut at = start;
            while at < end {
                let n = (end - at).min(chunk) as usize;
                let raw = match reader.take(n) {
                    Ok(raw) => raw,
                    Err(e) => {
                        tracing::debug!(path = %job.info.path, error = %e, "frame filler: cannot read the NAR");
                        return Pass::Ended(Filled::Unreadable);
                    }
                };
                // Dropping the stream stops its reading.
                if self.state.idle_for() < QUIET.as_millis() as u64 || self.shutdown.is_cancelled()
                {
                    return Pass::Interrupted;
                }
                let frame = packer.pack_with(&raw, Some(Codec::Zstd));
                if let Some(zstd) = nar_chunks::zstd_payload(&frame, false) {
                    let (frames, key, zstd) = (self.frames.clone(), job.key.clone(), zstd.to_vec());
                    let slot = at / chunk;
                    match self.on_pool(move || frames.put(&key, slot, &raw, &zstd)) {
                        Some(Put::Kept) => {
                            self.state.stats.filled.inc();
                        }
                        Some(Put::NoRoom) => return Pass::Ended(Filled::NoRoom),
                        Some(Put::Had | Put::Unfit) => {}
                        None => return Pass::Ended(Filled::Busy),
                    }
                }
                at += n as u64;
            }
        }
        Pass::Ended(Filled::Done)
    }

    /// Runs `f` on the runtime's blocking pool, at normal priority, and
    /// waits for it; `None` if the runtime is shutting down.
    fn on_pool<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        self.runtime.block_on(self.runtime.spawn_blocking(f)).ok()
    }

    /// Waits until no peer has been served for `QUIET`; `false` if the
    /// agent stops or `GIVE_UP` passes from `began`.
    fn quiet_moment(&self, began: Instant) -> bool {
        let quiet = QUIET.as_millis() as u64;
        loop {
            if self.shutdown.is_cancelled() || began.elapsed() > GIVE_UP {
                return false;
            }
            let idle = self.state.idle_for();
            if idle >= quiet {
                return true;
            }
            std::thread::sleep(Duration::from_millis((quiet - idle).min(100)));
        }
    }
}

/// A NAR stream read in chunks of a given length.
struct ChunkReader {
    rx: ChunkReceiver<Result<bytes::Bytes, NarStreamError>>,
    /// Bytes received past the last chunk taken.
    pending: BytesMut,
}

impl ChunkReader {
    /// The next `n` bytes; the stream must have that many left.
    fn take(&mut self, n: usize) -> Result<BytesMut, String> {
        while self.pending.len() < n {
            match self.rx.blocking_recv() {
                Some(Ok(bytes)) => self.pending.extend_from_slice(&bytes),
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("the NAR ended early".into()),
            }
        }
        Ok(self.pending.split_to(n))
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
