//! The broker in a container: its memory watermark, given as a fraction,
//! is a fraction of the control group's memory limit (a container's
//! `--memory`), not of the machine's RAM. The test makes a control group
//! with a 256 MiB limit (cgroup v2, or v1's memory hierarchy), starts the
//! `warren` binary in it and reads `mem_limit` from `/api/nodes`. Making a
//! control group needs root and a writable `/sys/fs/cgroup` (CI has both);
//! elsewhere it says why it is skipped.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const LIMIT: u64 = 256 << 20;

/// A control group made for the test, removed (after its process) on drop.
struct Group {
    dir: PathBuf,
}

impl Group {
    /// A new group limited to `limit` octets, or why one cannot be made.
    fn make(limit: u64) -> Result<Group, String> {
        let name = format!("warren-test-{}", std::process::id());
        let unified = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let (dir, file) = if unified {
            // (The root may not delegate the memory controller yet.)
            let _ = std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", "+memory");
            (Path::new("/sys/fs/cgroup").join(&name), "memory.max")
        } else {
            (
                Path::new("/sys/fs/cgroup/memory").join(&name),
                "memory.limit_in_bytes",
            )
        };
        std::fs::create_dir(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        let group = Group { dir };
        std::fs::write(group.dir.join(file), limit.to_string())
            .map_err(|e| format!("{file}: {e}"))?;
        Ok(group)
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `GET path` on the management port as guest; the body once it answers
/// 200.
fn get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    // guest:guest
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Basic Z3Vlc3Q6Z3Vlc3Q=\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// A chunked body's JSON (hyper answers `Connection: close` requests
/// with a length or chunks).
fn json_of(body: &str) -> Option<serde_json::Value> {
    if let Ok(v) = serde_json::from_str(body) {
        return Some(v);
    }
    let start = body.find(['[', '{'])?;
    let end = body.rfind([']', '}'])?;
    serde_json::from_str(&body[start..=end]).ok()
}

#[test]
fn a_fractional_watermark_is_a_fraction_of_the_containers_memory_limit() {
    let group = match Group::make(LIMIT) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("skipped: cannot make a control group (needs root): {e}");
            return;
        }
    };
    let data = std::env::temp_dir().join(format!("warren-cgroup-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let (amqp, management) = (free_port(), free_port());
    // The shell joins the group, then becomes the broker.
    let procs = group.dir.join("cgroup.procs");
    let mut broker = Broker(
        Command::new("sh")
            .arg("-c")
            .arg(r#"echo $$ > "$0" && exec "$@""#)
            .arg(&procs)
            .arg(env!("CARGO_BIN_EXE_warren"))
            .args(["--data-dir", &data.to_string_lossy()])
            .args(["--bind", "127.0.0.1", "--port", &amqp.to_string()])
            .args(["--management-port", &management.to_string()])
            .args(["--no-prometheus", "--memory-high-watermark", "0.4"])
            .env("WARREN_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn warren"),
    );
    // Its log (stdout) says when the management API listens; the rest of
    // it is drained.
    let mut log = BufReader::new(broker.0.stdout.take().expect("stdout")).lines();
    let mut seen = Vec::new();
    loop {
        match log.next() {
            Some(Ok(line)) if line.contains("management API listening") => break,
            Some(Ok(line)) => seen.push(line),
            _ => panic!("the broker stopped before listening: {seen:#?}"),
        }
    }
    std::thread::spawn(move || log.for_each(drop));
    let body = get(management, "/api/nodes").expect("/api/nodes answers 200");
    let nodes = json_of(&body).expect("JSON from /api/nodes");
    let mem_limit = nodes[0]["mem_limit"].as_u64().expect("mem_limit");
    let expected = LIMIT / 10 * 4;
    assert!(
        mem_limit.abs_diff(expected) <= 1 << 10,
        "mem_limit {mem_limit}, expected 0.4 of the group's {LIMIT}: {expected}"
    );
    drop(broker);
    drop(group);
    let _ = std::fs::remove_dir_all(&data);
}
