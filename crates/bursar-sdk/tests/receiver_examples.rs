//! Runs the receiver examples in `docs/webhooks/examples/` with their own interpreters, so
//! the code customers copy keeps verifying the spec's test vector. Each script checks both
//! signature schemes and a tampered-body rejection when run without arguments.
//!
//! An interpreter that is not installed skips its example with a note instead of failing:
//! the Rust build should not require Python, Node.js and PHP on every machine.

use std::io::ErrorKind;
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/webhooks/examples")
}

/// Whether `interpreter` can be started from `PATH` (a `which`, portable to every OS).
fn available(interpreter: &str) -> Result<(), String> {
    match Command::new(interpreter)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(format!("`{interpreter} --version` exited with {status}")),
        Err(e) if e.kind() == ErrorKind::NotFound => Err(format!("`{interpreter}` is not on PATH")),
        Err(e) => Err(format!("`{interpreter}` could not be started: {e}")),
    }
}

fn run_example(interpreter: &str, script: &str) {
    let path = examples_dir().join(script);
    assert!(path.is_file(), "{} is missing", path.display());
    if let Err(why) = available(interpreter) {
        println!("skipped receiver example {script}: {why}");
        return;
    }
    let out = Command::new(interpreter)
        .arg(&path)
        .current_dir(examples_dir())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {interpreter} {script}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{interpreter} {script} exited with {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    // Every check line starts with "ok" or "FAIL"; a script that silently checked nothing
    // would pass on exit status alone.
    assert!(
        stdout.lines().filter(|l| l.starts_with("ok")).count() >= 3,
        "{script} reported too few checks:\n{stdout}"
    );
    assert!(!stdout.contains("FAIL"), "{script}:\n{stdout}");
}

#[test]
fn python_example_verifies_the_test_vector() {
    run_example("python3", "verify.py");
}

#[test]
fn node_example_verifies_the_test_vector() {
    run_example("node", "verify.js");
}

#[test]
fn php_example_verifies_the_test_vector() {
    run_example("php", "verify.php");
}
