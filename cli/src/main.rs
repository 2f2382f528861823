//! `syncctl`: the command-line client of syncd.

use clap::Parser;

/// Command-line client for a syncd cluster. Commands arrive with the node runtime and each
/// primitive; for now it only knows its endpoints.
#[derive(Parser, Debug)]
#[command(name = "syncctl", version, about)]
struct Cli {
    /// Cluster members to contact, comma-separated host:port.
    #[arg(
        long,
        env = "SYNC_ENDPOINTS",
        default_value = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003",
        global = true
    )]
    endpoints: String,
}

fn main() {
    let cli = Cli::parse();
    println!("endpoints: {}", cli.endpoints);
}
