//! Helpers for tests that run `carmine` as a process, the way an operator does.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const CARMINE: &str = env!("CARGO_BIN_EXE_carmine");

/// A directory under cargo's target tmp dir (a real filesystem: O_DIRECT works there, unlike
/// tmpfs), removed when the test ends.
/// `serve` options for the segment store on `device`: 512 MiB, 4 MiB segments, 2 cores on CPUs
/// 0 and 1 (the shape the crash and restart tests share).
pub fn segment_args(device: &str) -> [&str; 12] {
    [
        "--store",
        "segment",
        "--device",
        device,
        "--device-size",
        "512MiB",
        "--segment-size",
        "4MiB",
        "--cores",
        "2",
        "--cpus",
        "0,1",
    ]
}

pub struct TestDir(pub std::path::PathBuf);

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        let path = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TestDir(path)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a test body (a `fn(&[&str])` taking extra server arguments) once on each of the
/// rtc server's TCP system-call paths: `serve --tcp-io epoll` (the default) and `uring`.
#[macro_export]
macro_rules! on_both_tcp_paths {
    ($name:ident) => {
        mod $name {
            #[test]
            fn epoll() {
                super::$name(&[]);
            }
            #[test]
            fn uring() {
                if let Err(why) = $crate::common::io_uring_available() {
                    // Where the kernel refuses io_uring the server would run on epoll (the
                    // fallback has its own test); nothing here would test io_uring.
                    eprintln!("SKIP: io_uring unavailable in this environment ({why})");
                    return;
                }
                super::$name(&["--tcp-io", "uring"]);
            }
        }
    };
}

/// Whether this process may set up an io_uring (seccomp profiles and
/// `kernel.io_uring_disabled` refuse it).
pub fn io_uring_available() -> std::io::Result<()> {
    // SAFETY: io_uring_setup with one entry and a zeroed params struct the kernel fills; the
    // descriptor it returns is closed at once.
    unsafe {
        let mut params = [0u8; 120]; // struct io_uring_params
        let fd = libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr());
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        libc::close(fd as i32);
    }
    Ok(())
}

/// A `carmine serve` child process, stopped with SIGINT (and checked for a clean exit) on drop.
pub struct ServerProcess {
    child: Option<Child>,
    pub addr: String,
    /// Log lines up to and including the "serving on" banner.
    pub startup_log: Vec<String>,
    log: std::sync::mpsc::Receiver<String>,
}

impl ServerProcess {
    pub fn start(extra_args: &[&str]) -> ServerProcess {
        ServerProcess::start_with(extra_args, |_| {})
    }

    /// `start`, with a last say over the command (`configure`), e.g. to restrict the process.
    pub fn start_with(extra_args: &[&str], configure: impl FnOnce(&mut Command)) -> ServerProcess {
        let mut command = Command::new(CARMINE);
        command
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--idle",
                "adaptive",
                "--chunk-count",
                "64",
            ])
            // The default store is the segment store on ./carmine.img: tests running side by
            // side must not share it, so they get the memory store unless they name one.
            .args(if extra_args.contains(&"--store") {
                &[][..]
            } else {
                &["--store", "memory"][..]
            })
            .args(extra_args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        configure(&mut command);
        let mut child = command.spawn().expect("spawn carmine serve");
        let stderr = child.stderr.take().expect("piped stderr");
        let (sender, log) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        // Generous: a debug build replaying a log after a kill, on a machine busy with other
        // tests, takes a while; a server that fails says so in its log, shown below.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut startup_log = Vec::new();
        loop {
            let line = log
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|e| {
                    panic!(
                        "server did not announce its address ({e}); its log so far:\n{}",
                        startup_log.join("\n")
                    )
                });
            startup_log.push(line.clone());
            if let Some(rest) = line.split(" serving on ").nth(1) {
                let addr = rest
                    .split_whitespace()
                    .next()
                    .expect("address after 'serving on'")
                    .to_string();
                return ServerProcess {
                    child: Some(child),
                    addr,
                    startup_log,
                    log,
                };
            }
        }
    }

    /// Log lines printed so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.try_iter().collect()
    }

    /// The server's resident memory (VmRSS), in KiB.
    pub fn rss_kib(&self) -> u64 {
        let pid = self.child.as_ref().expect("running").id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .expect("child")
            .try_wait()
            .expect("try_wait")
            .is_none()
    }

    /// SIGKILL, as a crash: no chance to finish anything.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("kill");
        child.wait().expect("wait");
    }

    /// Runs `carmine load --target <this server> <load_args>` in the background, kills the
    /// server (SIGKILL) `after` it started, and waits for the load, which fails when the
    /// server dies under it: that is the point.
    pub fn kill_under_load(&mut self, load_args: &[&str], after: Duration) {
        let mut args = vec!["load".to_string(), "--target".into(), self.addr.clone()];
        args.extend(load_args.iter().map(|a| a.to_string()));
        let writer = std::thread::spawn(move || {
            let _ = Command::new(CARMINE).args(&args).output();
        });
        std::thread::sleep(after);
        self.kill();
        writer.join().unwrap();
    }

    /// SIGINT, then wait: the server must exit cleanly (status 0) within a few seconds.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("server did not stop within 10 s of SIGINT");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The server's own account is the first thing to read when a test fails.
            std::thread::sleep(Duration::from_millis(100));
            for line in self.log.try_iter() {
                eprintln!("server: {line}");
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `carmine` with `args` and parses its stdout as JSON. Panics with stderr on failure.
pub fn carmine_json(args: &[&str]) -> serde_json::Value {
    let output = Command::new(CARMINE)
        .args(args)
        .output()
        .expect("run carmine");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "carmine {args:?} failed: {stderr}");
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("carmine {args:?}: bad JSON ({e}): {stdout}"))
}

pub fn load(addr: &str, args: &[&str]) -> serde_json::Value {
    let mut full = vec!["load", "--target", addr, "--json"];
    full.extend_from_slice(args);
    carmine_json(&full)
}

/// `head` followed by `tail`: an op's own arguments before the shape a test's runs share.
pub fn args_with<'a>(head: &[&'a str], tail: &[&'a str]) -> Vec<&'a str> {
    let mut args = head.to_vec();
    args.extend_from_slice(tail);
    args
}

/// A `carmine load --json` report of a run that did ops, with no errors and (under
/// `--verify`) no verification failures.
pub fn assert_clean(report: &serde_json::Value, what: &str) {
    assert!(
        report["ops"].as_u64().unwrap() > 0,
        "{what}: no ops done: {report}"
    );
    assert_eq!(report["errors"], 0, "{what}: errors: {report}");
    assert_eq!(
        report["verify_failures"], 0,
        "{what}: verify failures: {report}"
    );
}

pub fn status(addr: &str) -> serde_json::Value {
    carmine_json(&["status", "--target", addr, "--json"])
}

pub fn total(status: &serde_json::Value, name: &str) -> u64 {
    status["totals"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in status"))
}

// ---- a minimal raw client, independent of the `carmine` code, to speak the wire format ----

pub const MAGIC: u32 = u32::from_le_bytes(*b"CRMN");

pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// (code, name, data, offset, length)
pub type RawSubOp<'a> = (u8, &'a [u8], &'a [u8], u64, u64);

pub fn raw_frame(opcode: u8, request_id: u64, oid: &[u8], ops: &[RawSubOp<'_>]) -> Vec<u8> {
    let mut payload = Vec::new();
    for (code, name, data, offset, length) in ops {
        payload.push(*code);
        payload.push(0);
        payload.extend_from_slice(&(name.len() as u16).to_le_bytes());
        payload.extend_from_slice(&(data.len() as u32).to_le_bytes());
        payload.extend_from_slice(&offset.to_le_bytes());
        payload.extend_from_slice(&length.to_le_bytes());
    }
    for (_, name, data, _, _) in ops {
        payload.extend_from_slice(name);
        payload.extend_from_slice(data);
    }
    let mut frame = Vec::new();
    frame.extend_from_slice(&MAGIC.to_le_bytes());
    frame.push(1);
    frame.push(opcode);
    frame.extend_from_slice(&0u16.to_le_bytes());
    frame.extend_from_slice(&request_id.to_le_bytes());
    frame.extend_from_slice(&(oid.len() as u16).to_le_bytes());
    frame.extend_from_slice(&(ops.len() as u16).to_le_bytes());
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&0u32.to_le_bytes());
    let mut covered = frame.clone();
    covered.extend_from_slice(oid);
    covered.extend_from_slice(&payload);
    frame.extend_from_slice(&crc32c(&covered).to_le_bytes());
    frame.extend_from_slice(oid);
    frame.extend_from_slice(&payload);
    frame
}

pub struct RawReply {
    pub opcode: u8,
    pub request_id: u64,
    pub status: u32,
    pub sub_op_count: u16,
    pub payload: Vec<u8>,
}

/// Reads one reply frame and checks its crc. None when the server closed the connection.
pub fn read_reply(stream: &mut TcpStream) -> Option<RawReply> {
    let mut header = [0u8; 32];
    stream.read_exact(&mut header).ok()?;
    let oid_len = u16::from_le_bytes([header[16], header[17]]) as usize;
    let payload_len = u32::from_le_bytes(header[20..24].try_into().unwrap()) as usize;
    let mut rest = vec![0u8; oid_len + payload_len];
    stream.read_exact(&mut rest).ok()?;
    let mut covered = header[..28].to_vec();
    covered.extend_from_slice(&rest);
    assert_eq!(
        crc32c(&covered),
        u32::from_le_bytes(header[28..32].try_into().unwrap()),
        "reply crc"
    );
    Some(RawReply {
        opcode: header[5],
        request_id: u64::from_le_bytes(header[8..16].try_into().unwrap()),
        status: u32::from_le_bytes(header[24..28].try_into().unwrap()),
        sub_op_count: u16::from_le_bytes([header[18], header[19]]),
        payload: rest[oid_len..].to_vec(),
    })
}

pub fn connect(addr: &str) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

pub fn send(stream: &mut TcpStream, bytes: &[u8]) {
    stream.write_all(bytes).expect("send");
}

/// Reads every block of the objects `shape` names back with `--verify`: no errors, no
/// mismatches, and no block missing (every one was written before).
pub fn read_back_everything(addr: &str, shape: &[&str]) {
    let mut args = vec!["--op", "randread", "--verify", "--duration", "1s"];
    args.extend_from_slice(shape);
    let report = load(addr, &args);
    assert!(report["ops"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["verify_failures"], 0, "{report}");
    assert_eq!(
        report["unwritten_reads"], 0,
        "every prefilled block is still there: {report}"
    );
}

/// `carmine load --check LOG` against `addr`: it must exit 0 with no lost, corrupt or unread
/// block. `what` names the moment in failure messages. Returns the report.
pub fn check_ack_log(addr: &str, log: &str, what: &str) -> serde_json::Value {
    let output = Command::new(CARMINE)
        .args(["load", "--target", addr, "--check", log, "--json"])
        .output()
        .expect("run carmine load --check");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
        panic!(
            "{what}: no report: {stdout} {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    assert!(
        output.status.success(),
        "{what}: acknowledged writes lost or corrupt: {report:#}"
    );
    for key in ["lost", "corrupt", "read_errors"] {
        assert_eq!(report[key], 0, "{what}: {key}: {report:#}");
    }
    report
}

/// For `Command::pre_exec`: installs a seccomp filter that makes `io_uring_setup` fail with
/// ENOSYS in the process about to exec (Docker's default profile refuses io_uring likewise).
/// Only prctl calls on a stack array: safe between fork and exec.
pub fn refuse_io_uring_setup() -> std::io::Result<()> {
    const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const BPF_JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    let filter = [
        // Load seccomp_data.nr (offset 0); the tests run on one architecture, x86_64.
        libc::sock_filter {
            code: BPF_LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: BPF_JEQ_K,
            jt: 0,
            jf: 1,
            k: libc::SYS_io_uring_setup as u32,
        },
        libc::sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        },
        libc::sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ALLOW,
        },
    ];
    let program = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prctl with integer arguments, then with a pointer to a filter program that
    // lives across the call (the kernel copies it); results checked.
    let ok = unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
            && libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &program as *const libc::sock_fprog,
            ) == 0
    };
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
