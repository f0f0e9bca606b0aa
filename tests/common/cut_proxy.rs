//! An HTTP/1.1 proxy that cuts one response off in the middle of its body,
//! as a network fault would, and records every request it passed on (its
//! target, its `Range` header, the status that came back). One request per
//! connection: it asks the server to close after each.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Largest request or response head it reads.
const MAX_HEAD: usize = 64 * 1024;

#[derive(Clone, Debug)]
pub struct SeenRequest {
    pub target: String,
    pub range: Option<String>,
    pub status: u16,
    /// Whether this response was the one cut off.
    pub cut: bool,
}

pub struct CuttingProxy {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    stop: Arc<AtomicBool>,
}

impl CuttingProxy {
    /// Forwards to `upstream`. The first response to a request whose target
    /// starts with `cut_prefix` is cut off after `cut_after` body bytes.
    pub fn start(upstream: SocketAddr, cut_prefix: &str, cut_after: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let cut_done = Arc::new(AtomicBool::new(false));
        let (seen2, stop2, prefix) = (seen.clone(), stop.clone(), cut_prefix.to_string());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let (seen, cut_done, prefix) = (seen2.clone(), cut_done.clone(), prefix.clone());
                std::thread::spawn(move || {
                    if let Some(r) = pass_one(client, upstream, &prefix, cut_after, &cut_done) {
                        seen.lock().unwrap_or_else(|e| e.into_inner()).push(r);
                    }
                });
            }
        });
        Self { addr, seen, stop }
    }

    pub fn seen(&self) -> Vec<SeenRequest> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

/// Reads up to the end of a head (`\r\n\r\n`); returns the head and any
/// bytes read past it.
fn read_head(s: &mut TcpStream) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Some((buf, rest));
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn pass_one(
    mut client: TcpStream,
    upstream: SocketAddr,
    cut_prefix: &str,
    cut_after: u64,
    cut_done: &AtomicBool,
) -> Option<SeenRequest> {
    client
        .set_read_timeout(Some(Duration::from_secs(60)))
        .ok()?;
    let (head, _) = read_head(&mut client)?;
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let request_line = lines.next()?.to_string();
    let target = request_line.split(' ').nth(1)?.to_string();
    let mut forwarded = format!("{request_line}\r\n");
    let mut range = None;
    for line in lines.filter(|l| !l.is_empty()) {
        let name = line
            .split(':')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if name == "range" {
            range = line.split_once(':').map(|(_, v)| v.trim().to_string());
        }
        if name != "connection" {
            forwarded.push_str(line);
            forwarded.push_str("\r\n");
        }
    }
    forwarded.push_str("Connection: close\r\n\r\n");

    let mut server = TcpStream::connect(upstream).ok()?;
    server
        .set_read_timeout(Some(Duration::from_secs(60)))
        .ok()?;
    server.write_all(forwarded.as_bytes()).ok()?;
    let (resp_head, mut body) = read_head(&mut server)?;
    let status = String::from_utf8_lossy(&resp_head)
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let cut = target.starts_with(cut_prefix)
        && status / 100 == 2
        && cut_done
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
    client.write_all(&resp_head).ok()?;
    let mut left = if cut { cut_after } else { u64::MAX };
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let take = body.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if take > 0 && client.write_all(&body[..take]).is_err() {
            break;
        }
        left -= take as u64;
        if left == 0 {
            break;
        }
        match server.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => body = chunk[..n].to_vec(),
        }
    }
    let _ = client.flush();
    let _ = client.shutdown(Shutdown::Both);
    Some(SeenRequest {
        target,
        range,
        status,
        cut,
    })
}
