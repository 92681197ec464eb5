//! Compiles the TC programs under `bpf/` with clang into `$OUT_DIR/datapath.o`.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=bpf");
    println!("cargo:rerun-if-env-changed=SIGIL_CLANG");
    let clang = env::var("SIGIL_CLANG").unwrap_or_else(|_| "clang".to_owned());
    let Some(out_dir) = env::var_os("OUT_DIR").map(PathBuf::from) else {
        fail("OUT_DIR is not set (build.rs must run under cargo)");
    };
    let out = out_dir.join("datapath.o");
    let status = Command::new(&clang)
        .args([
            "-O2", "-g", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror", "-c",
        ])
        .arg("bpf/datapath.c")
        .arg("-o")
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => fail(&format!("`{clang}` failed to compile bpf/datapath.c ({s})")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => fail(&format!(
            "`{clang}` not found: the eBPF programs need clang; install it with \
             `apt-get install -y clang` (or point SIGIL_CLANG at a clang binary)"
        )),
        Err(e) => fail(&format!("could not run `{clang}`: {e}")),
    }
}

fn fail(msg: &str) -> ! {
    // cargo shows a build script's stderr when it fails; `error:` makes the line stand out.
    eprintln!("error: sigil-datapath: {msg}");
    std::process::exit(1);
}
