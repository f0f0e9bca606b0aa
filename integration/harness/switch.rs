//! A switch with a wire delay, in user space: the bench's way to give the
//! LAN a real round-trip time, since this kernel has no `netem`.
//!
//! It takes the machine ends of the hosts' veths off the bridge and joins
//! them itself: every frame a host sends is read from its veth with a packet
//! socket, held for `one_way`, then written to the veth of the host whose
//! MAC address sent from there before (a learning switch), or to every other
//! port for broadcast, multicast (mDNS) and unknown addresses. Frames keep
//! their virtio-net header, so a 64 KiB TCP or UDP segmentation batch
//! crosses as one frame with its offload state, as it does on the bridge.
//! Every frame takes the same delay, so first in is first out: one sender
//! thread sleeps until the oldest frame is due.
//!
//! Dropping the switch stops it and puts the veths back on the bridge.
//!
//! Raw packet sockets have no safe wrapper in the dependencies: the libc
//! calls here are the harness's one use of unsafe code.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::exec::ip;

/// `struct virtio_net_hdr` in front of every frame (PACKET_VNET_HDR).
const VNET_HDR_LEN: usize = 10;
/// A segmentation batch is at most 64 KiB plus its Ethernet header.
const FRAME_MAX: usize = VNET_HDR_LEN + 14 + 65_535;
const ETH_P_ALL: u16 = 0x0003;
/// How often blocked threads look whether the switch is stopping.
const POLL: Duration = Duration::from_millis(100);
/// Socket buffers: a burst of a few ms at 10 Gbit/s must not be dropped.
const SOCKET_BUFFER: libc::c_int = 16 << 20;

struct Frame {
    port: usize,
    arrived: Instant,
    bytes: Vec<u8>,
}

/// Borrows the Lan whose veths it holds, so it cannot outlive them.
pub struct DelaySwitch<'lan> {
    _lan: PhantomData<&'lan ()>,
    bridge: String,
    veths: Vec<String>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl DelaySwitch<'_> {
    /// Takes `veths` off `bridge` and joins them with `one_way` of delay.
    pub fn start<'lan>(bridge: &str, veths: &[String], one_way: Duration) -> DelaySwitch<'lan> {
        // Opened while the veths are still on the bridge: the few frames of
        // that moment are bridged and then delivered again, late, which
        // every protocol on the LAN takes as a duplicate.
        let ports: Vec<Arc<OwnedFd>> = veths
            .iter()
            .map(|v| Arc::new(open_port(v).unwrap_or_else(|e| panic!("packet socket on {v}: {e}"))))
            .collect();
        for v in veths {
            ip(&["link", "set", v, "nomaster"]);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let mut threads = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let (port, tx, stop) = (port.clone(), tx.clone(), stop.clone());
            threads.push(std::thread::spawn(move || receive(i, &port, &tx, &stop)));
        }
        let stop2 = stop.clone();
        threads.push(std::thread::spawn(move || {
            forward(&ports, &rx, one_way, &stop2)
        }));
        DelaySwitch {
            _lan: PhantomData,
            bridge: bridge.to_string(),
            veths: veths.to_vec(),
            stop,
            threads,
        }
    }
}

impl Drop for DelaySwitch<'_> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Not `ip()`: a panic here, while a failed test unwinds, would abort
        // before the Lan's cleanup; the cleanup removes the links anyway.
        for v in &self.veths {
            let back = std::process::Command::new("ip")
                .args(["link", "set", v, "master", &self.bridge])
                .status();
            if !back.is_ok_and(|s| s.success()) {
                eprintln!("nixmesh-lan: cannot put {v} back on {}", self.bridge);
            }
        }
    }
}

fn receive(port: usize, fd: &OwnedFd, tx: &Sender<Frame>, stop: &AtomicBool) {
    let mut buf = vec![0u8; FRAME_MAX];
    let mut complained = false;
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            // The receive timeout or a signal: look at `stop`. Anything else
            // loses frames (older kernels refuse UDP segmentation batches
            // here), which a benchmark must not do in silence.
            let e = io::Error::last_os_error();
            let quiet = matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            );
            if !quiet && !complained {
                eprintln!("nixmesh-lan: switch port {port} drops frames: {e}");
                complained = true;
            }
            continue;
        }
        let n = n as usize;
        if n < VNET_HDR_LEN + 14 {
            continue;
        }
        let frame = Frame {
            port,
            arrived: Instant::now(),
            bytes: buf[..n].to_vec(),
        };
        if tx.send(frame).is_err() {
            return;
        }
    }
}

fn forward(ports: &[Arc<OwnedFd>], rx: &Receiver<Frame>, one_way: Duration, stop: &AtomicBool) {
    // Sleeps end within microseconds of the deadline, not the default 50.
    // SAFETY: prctl with an integer argument touches no memory.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    let mut macs: HashMap<[u8; 6], usize> = HashMap::new();
    while !stop.load(Ordering::Relaxed) {
        let frame = match rx.recv_timeout(POLL) {
            Ok(f) => f,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let due = frame.arrived + one_way;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let eth = &frame.bytes[VNET_HDR_LEN..];
        let (dst, src) = (mac(&eth[0..6]), mac(&eth[6..12]));
        macs.insert(src, frame.port);
        let known = macs.get(&dst).copied().filter(|_| dst[0] & 1 == 0);
        match known {
            Some(p) if p == frame.port => {}
            Some(p) => send(&ports[p], &frame.bytes),
            None => {
                for (p, fd) in ports.iter().enumerate() {
                    if p != frame.port {
                        send(fd, &frame.bytes);
                    }
                }
            }
        }
    }
}

fn mac(b: &[u8]) -> [u8; 6] {
    let mut m = [0u8; 6];
    m.copy_from_slice(b);
    m
}

/// A frame a port cannot take is lost, as on a real switch.
fn send(fd: &OwnedFd, frame: &[u8]) {
    // SAFETY: `frame` is valid for reads of its length.
    unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
}

/// A packet socket bound to `ifname` that reads and writes whole frames
/// behind a virtio-net header, and does not see its own sends.
fn open_port(ifname: &str) -> io::Result<OwnedFd> {
    let name = CString::new(ifname).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: plain syscalls on integers and on locals that outlive them.
    unsafe {
        let ifindex = libc::if_nametoindex(name.as_ptr());
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        // Protocol 0 until bound: no frames of other interfaces in between.
        let raw = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(raw);
        let one: libc::c_int = 1;
        set(&fd, libc::SOL_PACKET, libc::PACKET_VNET_HDR, &one)?;
        set(&fd, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, &one)?;
        set(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &SOCKET_BUFFER)?;
        set(&fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, &SOCKET_BUFFER)?;
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: POLL.as_micros() as libc::suseconds_t,
        };
        set(&fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &timeout)?;
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETH_P_ALL.to_be();
        addr.sll_ifindex = ifindex as i32;
        let rc = libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        );
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    }
}

/// # Safety
/// `T` must be the type the kernel expects for `level`/`name`.
unsafe fn set<T>(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    let rc = libc::setsockopt(
        fd.as_raw_fd(),
        level,
        name,
        (value as *const T).cast(),
        std::mem::size_of::<T>() as libc::socklen_t,
    );
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
