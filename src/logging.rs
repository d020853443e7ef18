//! Where the node's log goes: stderr, as text or JSON lines, filtered by `[log] level` or
//! `RUST_LOG`.

use tracing_subscriber::filter::Targets;

use crate::config::Config;

/// Logs to stderr at `[log] level` (`RUST_LOG` overrides it), as text or JSON lines.
pub fn init_logging(config: &Config) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.is_empty())
        .and_then(|v| match crate::config::log_filter(&v) {
            Ok(t) => Some(t),
            Err(m) => {
                eprintln!("warning: RUST_LOG=`{v}` {m}; using log.level");
                None
            }
        })
        // log.level was checked when the config was loaded.
        .unwrap_or_else(|| {
            crate::config::log_filter(&config.log.level)
                .unwrap_or_else(|_| Targets::new().with_default(tracing::Level::INFO))
        });
    // Colours only for a person at a terminal: not in files, pipes or journals.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    // The fmt subscriber's own default stops at INFO: let everything through to the filter.
    let builder = tracing_subscriber::fmt()
        .with_max_level(tracing::level_filters::LevelFilter::TRACE)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = match config.log.format {
        crate::config::LogFormat::Json => builder.json().finish().with(filter).try_init(),
        crate::config::LogFormat::Text => builder.finish().with(filter).try_init(),
    };
}
