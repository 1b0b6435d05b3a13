//! No binary floating point on the money path (issue 4): no `f32`/`f64` type, literal
//! suffix or cast in the source of the crates money flows through — the domain rules, the wire
//! types, storage and both backends, the server (services, rendering, the processor client)
//! and the sandbox processor. Doc comments may name the types to say why they are absent.

use std::path::{Path, PathBuf};

const MONEY_PATH: &[&str] = &[
    "bursar-domain",
    "bursar-api",
    "bursar-storage",
    "bursar-storage-sqlite",
    "bursar-storage-postgres",
    "bursar-server",
    "bursar-sandbox",
    "bursar-sdk",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Whether `line` (outside comments) uses a float type as a word.
fn uses_float(line: &str) -> bool {
    let code = line.split("//").next().unwrap_or("");
    code.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .any(|word| {
            word == "f32"
                || word == "f64"
                || (word.ends_with("f64") || word.ends_with("f32"))
                    && word.starts_with(|c: char| c.is_ascii_digit())
        })
}

#[test]
fn no_float_anywhere_on_the_money_path() {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for krate in MONEY_PATH {
        rust_files(&crates.join(krate).join("src"), &mut files);
    }
    assert!(
        files.len() > 40,
        "the scan must see the sources ({})",
        files.len()
    );
    let mut found = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            if uses_float(line) {
                found.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "floats on the money path:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_scan_recognises_floats() {
    assert!(uses_float("let rate: f64 = 0.9;"));
    assert!(uses_float("let x = 1.5f64;"));
    assert!(uses_float("minor as f32"));
    assert!(!uses_float("/// never through `f64`"));
    assert!(!uses_float("let f64_free = 1; // f64"));
}
