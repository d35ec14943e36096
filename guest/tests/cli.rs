//! `ivring-guest` as operators meet it: the help without arguments.

use std::process::Command;

#[test]
fn no_arguments_print_the_help_and_exit_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_ivring-guest"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("Usage: ivring-guest [OPTIONS] <COMMAND>"),
        "{err}"
    );
    for sub in ["probe", "serve", "check", "bridge"] {
        assert!(
            err.lines().any(|l| l.trim_start().starts_with(sub)),
            "{sub} not listed: {err}"
        );
    }
}
