//! Assembles the micro-guests in `asm/` with the system's GNU assembler and linker into flat
//! binaries linked at `CODE_BASE`, so that they are embedded in the crate with `include_bytes!`.
//! Needs binutils (`as`, `ld`), which every Debian/Ubuntu build machine has with gcc.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Must equal `guests::CODE_BASE`; a unit test checks that it does.
const CODE_BASE: &str = "0x100000";

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (install binutils: `as` and `ld`)"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn main() {
    let asm_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("asm");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed={}", asm_dir.display());

    let mut sources: Vec<PathBuf> = std::fs::read_dir(&asm_dir)
        .expect("crates/guests/asm exists")
        .map(|entry| entry.expect("readable directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "S"))
        .collect();
    sources.sort();

    for source in sources {
        println!("cargo:rerun-if-changed={}", source.display());
        let name = source.file_stem().unwrap().to_string_lossy().into_owned();
        let object = out_dir.join(format!("{name}.o"));
        let binary = out_dir.join(format!("{name}.bin"));
        run(Command::new("as")
            .arg("--64")
            .arg("-I")
            .arg(&asm_dir)
            .arg("-o")
            .arg(&object)
            .arg(&source));
        run(Command::new("ld")
            .args([
                "-nostdlib",
                "--oformat",
                "binary",
                "-Ttext",
                CODE_BASE,
                "-e",
                "_start",
            ])
            .arg("-o")
            .arg(&binary)
            .arg(&object));
    }
}
