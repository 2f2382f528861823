//! `syncd`: one node of a syncd cluster. See `syncd --help`.

use std::process::ExitCode;

use clap::Parser;
use syncd::node::config::{Flags, LogFormat, Settings};
use syncd::node::logging::WithTerm;
use tracing_subscriber::EnvFilter;

fn init_tracing(s: &Settings) {
    use tracing_subscriber::fmt::format;
    let filter = EnvFilter::try_new(&s.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    match s.log_format {
        LogFormat::Json => builder
            .json()
            .event_format(WithTerm::json(format().json().with_current_span(true)))
            .init(),
        LogFormat::Text => builder
            .event_format(WithTerm::text(format().with_ansi(false)))
            .init(),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    let settings = match flags.merge_config_file().and_then(Flags::resolve) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("syncd: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(&settings);
    let node_span = tracing::info_span!("node", id = settings.id);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("syncd: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(tracing::Instrument::instrument(
        syncd::server::serve(settings, shutdown_signal()),
        node_span,
    ));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "exiting");
            eprintln!("syncd: {e}");
            ExitCode::from(1)
        }
    }
}
