//! `tally-load`: see the `loadtest` library.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    loadtest::main_entry().await
}
