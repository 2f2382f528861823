//! Reading a payload given on the command line: the argument itself, a file, or stdin.

use std::io::Read;
use std::path::Path;

use anyhow::Context;

/// The bytes of `arg` if given, else of `file`, else everything on stdin. `what` names the
/// payload in errors ("the message", "the value").
pub fn payload(arg: Option<&str>, file: Option<&Path>, what: &str) -> anyhow::Result<Vec<u8>> {
    if let Some(text) = arg {
        return Ok(text.as_bytes().to_vec());
    }
    if let Some(path) = file {
        return std::fs::read(path).with_context(|| format!("cannot read {}", path.display()));
    }
    let mut bytes = Vec::new();
    std::io::stdin()
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {what} from stdin"))?;
    Ok(bytes)
}
