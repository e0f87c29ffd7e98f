//! `paxwasm exec` as a process: the documented output lines and exit status.

use std::process::Command;

use paxwasm::examples::example_module;

fn exec(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_paxwasm"))
        .arg("exec")
        .args(args)
        .output()
        .unwrap();
    (
        output.status.code().unwrap(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

#[test]
fn exec_prints_results_queries_and_the_state_hash() {
    let counter = example_module("counter").unwrap();
    let (code, stdout, _) = exec(&[
        counter.to_str().unwrap(),
        "--query",
        "get",
        "add 2",
        "add 40",
        "--query",
        "nope",
    ]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[..4], ["2", "42", "42", "ERR unknown query"]);
    assert_eq!(lines.len(), 5);
    let hash = lines[4].strip_prefix("state sha256:").unwrap();
    assert!(
        hash.len() == 64
            && hash
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    // Same inputs, same hash.
    let (_, again, _) = exec(&[counter.to_str().unwrap(), "add 2", "add 40"]);
    assert_eq!(again.lines().last().unwrap(), lines[4]);
}

#[test]
fn exec_prints_an_error_line_for_a_failed_command_and_still_exits_zero() {
    let dir = std::env::temp_dir().join(format!("paxwasm-exec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let trapping = dir.join("trap.wasm");
    let bytes = wat::parse_str(
        r#"(module (memory (export "memory") 1)
             (func (export "paxwasm_alloc") (param i32) (result i32) (i32.const 0))
             (func (export "paxwasm_apply") (param i32 i32) (result i64) (unreachable)))"#,
    )
    .unwrap();
    std::fs::write(&trapping, bytes).unwrap();
    let (code, stdout, _) = exec(&[trapping.to_str().unwrap(), "x"]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "error: trap: unreachable");
    assert!(lines[1].starts_with("state sha256:"));

    let refused = dir.join("refused.wasm");
    std::fs::write(
        &refused,
        wat::parse_str(r#"(module (import "env" "f" (func)))"#).unwrap(),
    )
    .unwrap();
    let (code, stdout, stderr) = exec(&[refused.to_str().unwrap(), "x"]);
    assert_ne!(code, 0);
    assert_eq!(stdout, "");
    assert!(stderr.contains("`env.f`"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}
