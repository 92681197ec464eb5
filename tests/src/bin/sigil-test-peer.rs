//! A Workload API peer for the attestation tests: `connect SOCKET` connects to a Unix socket as this
//! process and prints `connected FD`; then each stdin line `exec PATH` replaces the process with
//! `PATH idle` (the test keeps a copy of the connection). `idle` waits for stdin to close.
#![forbid(unsafe_code)]

use std::io::{BufRead, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["idle"] => {
            let _ = std::io::stdin().lock().lines().count();
            ExitCode::SUCCESS
        }
        ["connect", socket] => {
            let conn = match std::os::unix::net::UnixStream::connect(socket) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("connect {socket}: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let mut out = std::io::stdout().lock();
            if writeln!(out, "connected {}", conn.as_raw_fd())
                .and_then(|()| out.flush())
                .is_err()
            {
                return ExitCode::FAILURE;
            }
            drop(out);
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if let Some(path) = line.strip_prefix("exec ") {
                    let e = std::process::Command::new(path).arg("idle").exec();
                    eprintln!("exec {path}: {e}");
                    return ExitCode::FAILURE;
                }
            }
            drop(conn);
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("usage: sigil-test-peer connect SOCKET | idle");
            ExitCode::from(2)
        }
    }
}
