//! The `tally-edge` command line: every command documents itself. (Building this test also builds
//! the binary that `tally-load --spawn` and the fault tests run.)

use std::process::Command;

fn help(args: &[&str]) -> String {
    let output =
        Command::new(env!("CARGO_BIN_EXE_tally-edge")).args(args).arg("--help").output().expect("runs");
    assert!(output.status.success(), "{args:?} --help failed");
    String::from_utf8(output.stdout).expect("utf-8")
}

#[test]
fn commands_describe_themselves() {
    let top = help(&[]);
    for command in ["migrate", "tenant", "key", "--wire-addr", "--http-addr", "--operator-key"] {
        assert!(top.contains(command), "tally-edge --help lacks {command}:\n{top}");
    }
    let key = help(&["key", "create"]);
    for flag in ["--tenant", "--scopes", "--label", "--expires"] {
        assert!(key.contains(flag), "key create --help lacks {flag}:\n{key}");
    }
}
