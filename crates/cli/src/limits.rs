//! The open-files limit of the long-running commands: every device connection is a socket, and
//! the soft limit (often 1024) would refuse connections long before the hard one (20,000 on
//! the team's machines). `devtables cloud` and `devtables sim` raise it at start and say so.

/// Raises the soft open-files limit to the hard one and says so on stderr; `why` tells what
/// needs it. A failure is reported and the command goes on with the limit it has.
pub(crate) fn raise_open_files(why: &str) {
    match devtables_fleet::procfs::raise_open_files_limit() {
        Ok(l) if l.after > l.before => eprintln!(
            "open files: soft limit raised from {} to {} (the hard limit; {why})",
            l.before, l.after
        ),
        Ok(l) => eprintln!("open files: limit {} (the hard limit; {why})", l.after),
        Err(e) => eprintln!("open files: cannot raise the limit ({why}): {e}"),
    }
}
