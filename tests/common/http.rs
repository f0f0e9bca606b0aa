//! A tiny HTTP/1.1 client that can tell a complete body from a cut-off
//! one, and the checks of `Range` on NAR URLs that both NAR endpoints get.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// False when the connection ended before Content-Length bytes came.
    pub complete: bool,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request on a fresh connection; `raw_target` is sent as is.
pub fn http(addr: SocketAddr, method: &str, raw_target: &str) -> HttpReply {
    http_with(addr, method, raw_target, &[])
}

/// `http` with extra request headers.
pub fn http_with(
    addr: SocketAddr,
    method: &str,
    raw_target: &str,
    headers: &[(&str, &str)],
) -> HttpReply {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        s,
        "{method} {raw_target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{extra}\r\n"
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let mut reply = HttpReply {
        status,
        headers,
        body: Vec::new(),
        complete: true,
    };
    if method == "HEAD" {
        return reply;
    }
    let _ = r.read_to_end(&mut reply.body);
    if let Some(len) = reply.header("content-length") {
        let len: usize = len.parse().unwrap();
        reply.complete = reply.body.len() == len;
    }
    reply
}

pub fn get(addr: SocketAddr, target: &str) -> HttpReply {
    http(addr, "GET", target)
}

/// Checks how the NAR at `url` (whose bytes are `nar`, at least 2 KiB)
/// answers `Range`: `Accept-Ranges: bytes`; `206` with exactly the asked
/// bytes and a matching `Content-Range` for `bytes=N-`, `bytes=N-M` (also
/// past the end) and `bytes=-N`; `416` for a start past the end; the whole
/// NAR with `200` for a header that does not parse.
pub fn assert_nar_ranges(addr: SocketAddr, url: &str, nar: &[u8]) {
    let size = nar.len();
    assert!(size >= 2048, "a NAR of {size} bytes is too small to cut");
    let whole = get(addr, url);
    assert_eq!(whole.status, 200, "{url}");
    assert_eq!(whole.header("accept-ranges"), Some("bytes"));
    assert!(
        whole.complete && whole.body == nar,
        "{url}: whole NAR differs"
    );
    let mid = size / 2 + 3;
    for (range, first, last) in [
        (format!("bytes={mid}-"), mid, size - 1),
        ("bytes=0-".to_string(), 0, size - 1),
        ("bytes=10-1009".to_string(), 10, 1009),
        (
            format!("bytes={}-{}", size - 5, size + 100),
            size - 5,
            size - 1,
        ),
        (
            format!("bytes={}-{}", size - 1, size - 1),
            size - 1,
            size - 1,
        ),
        ("bytes=-7".to_string(), size - 7, size - 1),
    ] {
        let r = http_with(addr, "GET", url, &[("Range", &range)]);
        assert_eq!(r.status, 206, "{range}");
        assert!(r.complete, "{range}: cut off");
        assert!(r.body == nar[first..=last], "{range}: wrong bytes");
        let want = format!("bytes {first}-{last}/{size}");
        assert_eq!(r.header("content-range"), Some(want.as_str()), "{range}");
        assert_eq!(r.header("accept-ranges"), Some("bytes"), "{range}");
    }
    let head = http_with(addr, "HEAD", url, &[("Range", &format!("bytes={mid}-"))]);
    assert_eq!(head.status, 206);
    let left = (size - mid).to_string();
    assert_eq!(head.header("content-length"), Some(left.as_str()));
    for past in [
        format!("bytes={size}-"),
        format!("bytes={}-{}", size + 1, size + 9),
    ] {
        let r = http_with(addr, "GET", url, &[("Range", &past)]);
        assert_eq!(r.status, 416, "{past}");
        let want = format!("bytes */{size}");
        assert_eq!(r.header("content-range"), Some(want.as_str()), "{past}");
    }
    for bad in [
        "bytes=9-2",
        "bytes=x-",
        "pages=0-1",
        "bytes=0-1,4-5",
        "bytes",
    ] {
        let r = http_with(addr, "GET", url, &[("Range", bad)]);
        assert_eq!(r.status, 200, "{bad}");
        assert!(r.complete && r.body == nar, "{bad}: whole NAR differs");
    }
}
