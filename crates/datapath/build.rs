//! Compiles the TC programs under `bpf/` with clang into `$OUT_DIR/datapath.o`, and writes
//! `$OUT_DIR/abi_layout.rs`: the layout clang gives every struct of `bpf/sigil.h` for
//! `-target bpf`, which `src/abi.rs` checks its `#[repr(C)]` mirrors against at compile time,
//! and `$OUT_DIR/abi_defines.rs`: the header's integer `#define`s.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "build/layout.rs"]
mod layout;

fn main() {
    println!("cargo:rerun-if-changed=bpf");
    println!("cargo:rerun-if-changed=build");
    println!("cargo:rerun-if-env-changed=SIGIL_CLANG");
    let clang = env::var("SIGIL_CLANG").unwrap_or_else(|_| "clang".to_owned());
    let Some(out_dir) = env::var_os("OUT_DIR").map(PathBuf::from) else {
        fail("OUT_DIR is not set (build.rs must run under cargo)");
    };
    let out = out_dir.join("datapath.o");
    run(
        &clang,
        &[
            "-O2", "-g", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror", "-c",
        ],
        Path::new("bpf/datapath.c"),
        Some(&out),
    );
    if let Err(e) = abi_layout(&clang, &out_dir) {
        fail(&format!("reading the struct layouts of bpf/sigil.h: {e}"));
    }
}

/// Lays out every struct of the header with the same clang and target as the programs.
fn abi_layout(clang: &str, out_dir: &Path) -> Result<(), String> {
    let header =
        std::fs::read_to_string("bpf/sigil.h").map_err(|e| format!("reading bpf/sigil.h: {e}"))?;
    let names = layout::struct_names(&header);
    if names.is_empty() {
        return Err("no `struct NAME {` definitions found".to_owned());
    }
    let include = env::current_dir()
        .map_err(|e| format!("current directory: {e}"))?
        .join("bpf/sigil.h");
    let include = include.display().to_string();
    let dump = |name: &str, source: String| -> Result<Vec<layout::Record>, String> {
        let path = out_dir.join(name);
        std::fs::write(&path, source).map_err(|e| format!("writing {}: {e}", path.display()))?;
        let text = run(
            clang,
            &[
                "-target",
                "bpf",
                "-fsyntax-only",
                "-Xclang",
                "-fdump-record-layouts",
            ],
            &path,
            None,
        );
        layout::parse_dump(&text).map_err(|e| format!("{}: {e}", path.display()))
    };
    let mut records: Vec<layout::Record> =
        dump("abi_layout_probe.c", layout::layout_probe(&include, &names))?
            .into_iter()
            .filter(|r| names.contains(&r.name))
            .collect();
    for n in &names {
        if !records.iter().any(|r| &r.name == n) {
            return Err(format!("clang dumped no layout for struct {n}"));
        }
    }
    let sizes = dump("abi_size_probe.c", layout::size_probe(&include, &records))?;
    layout::apply_sizes(&mut records, &sizes)?;
    let path = out_dir.join("abi_layout.rs");
    std::fs::write(&path, layout::generate(&records))
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    let path = out_dir.join("abi_defines.rs");
    std::fs::write(
        &path,
        layout::generate_defines(&layout::int_defines(&header)),
    )
    .map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Runs clang on `input`, returning its standard output (the layout dump goes there).
fn run(clang: &str, args: &[&str], input: &Path, out: Option<&Path>) -> String {
    let mut cmd = Command::new(clang);
    cmd.args(args).arg(input);
    if let Some(out) = out {
        cmd.arg("-o").arg(out);
    }
    let what = input.display();
    match cmd.output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        Ok(o) => fail(&format!(
            "`{clang}` failed on {what} ({}):\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        )),
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
