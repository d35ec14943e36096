//! Helpers of the command-line binaries: arguments refused in one line, and an error with
//! its causes on one line.

/// An error and its causes on one line, for a binary's `error:` message. Like anyhow's
/// `{:#}`, but a cause is left out when the text before already ends with it: our
/// errors print their source in their own message *and* return it from `source()`.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !line.ends_with(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
    }
    line
}

/// Parses a binary's arguments; on bad arguments prints one line (the problem, then where
/// to look) and exits with status 2. `--help` and `--version` print as usual, and so does
/// the help that a command run without arguments prints (on stderr, status 2).
pub fn parse_args<P: clap::Parser>(bin: &str) -> P {
    parse_args_from(bin, P::command())
}

/// [`parse_args`] with a [`clap::Command`] adjusted by the caller (e.g. a value name).
pub fn parse_args_from<P: clap::FromArgMatches>(bin: &str, cmd: clap::Command) -> P {
    let matches = cmd
        .try_get_matches()
        .and_then(|mut m| P::from_arg_matches_mut(&mut m));
    match matches {
        Ok(p) => p,
        Err(e)
            if !e.use_stderr()
                || e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand =>
        {
            e.exit()
        }
        Err(e) => {
            let text = e.to_string();
            let problem: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .filter(|l| !l.is_empty())
                .collect();
            usage_error(bin, problem.join(" ").trim_start_matches("error: "))
        }
    }
}

/// Prints `BIN: error: PROBLEM (see BIN --help)` and exits with status 2, as for an
/// argument clap refused: for arguments that only make sense checked together.
pub fn usage_error(bin: &str, problem: &str) -> ! {
    eprintln!("{bin}: error: {problem} (see {bin} --help)");
    std::process::exit(2);
}
