//! nginx on a host, serving a `file://` binary cache (what `nix copy --to
//! file://…` writes): the upstream cache of the pull-through scenarios, and
//! the bench's baseline that sends the same NAR bytes as a static file.

use std::fs;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::host::Host;

/// nginx inside a host, serving `root` on its LAN address.
pub struct Nginx {
    child: Child,
}

impl Nginx {
    /// Starts nginx on `host`'s address at `port` and waits until it
    /// answers.
    pub fn start(host: &Host, root: &Path, port: u16) -> Nginx {
        let dir = host.dir().join("nginx");
        fs::create_dir_all(dir.join("tmp")).expect("mkdir nginx");
        let d = dir.display();
        let conf = format!(
            "user root;
worker_processes auto;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    types {{
        text/x-nix-narinfo narinfo;
        text/x-nix-cache-info nix-cache-info;
        application/x-nix-nar nar;
    }}
    default_type application/octet-stream;
    server {{
        listen {}:{port};
        root {};
    }}
}}
",
            host.addr(),
            root.display()
        );
        let conf_path = dir.join("nginx.conf");
        fs::write(&conf_path, conf).expect("write nginx.conf");
        let log = fs::File::create(dir.join("stderr.log")).expect("nginx log");
        let child = host
            .command(&[
                "nginx",
                "-p",
                &dir.display().to_string(),
                "-c",
                &conf_path.display().to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nginx");
        let mut nginx = Nginx { child };
        let url = format!("http://{}:{port}/nix-cache-info", host.addr());
        let deadline = Instant::now() + Duration::from_secs(10);
        while host.http_status(&url).0 != 200 {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                panic!(
                    "nginx exited ({status}): {}",
                    fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "nginx does not answer at {url}");
            std::thread::sleep(Duration::from_millis(50));
        }
        nginx
    }

    /// The nginx master's process id (the bench reads its CPU time).
    #[allow(dead_code)] // Not every user of the harness needs it.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (`STOP`, `CONT`) to the master and its workers: a
    /// stopped server keeps its connections and takes new ones into the
    /// kernel's backlog, but sends nothing, as a hung server does.
    #[allow(dead_code)] // Not every user of the harness needs it.
    pub fn signal(&self, signal: &str) {
        let master = self.child.id().to_string();
        let flag = format!("-{signal}");
        let _ = std::process::Command::new("pkill")
            .args([flag.as_str(), "-P", &master])
            .status();
        let _ = std::process::Command::new("kill")
            .args([flag.as_str(), &master])
            .status();
    }

    pub fn stop(&mut self) {
        // SIGTERM: the master takes its workers with it.
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}
