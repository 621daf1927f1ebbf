//! A CPU-heavy service: thumbnails rendered on the blocking pool, as many at once as there
//! are cores (`CONEJO_QUEUES__SHOP_THUMBNAILS__CONCURRENCY` to change it), while the
//! connection keeps its heartbeats on its own thread. `run` (default) or `check`, like
//! `orders-service`.

use std::process::ExitCode;

use conejo::Blocking;
use example_shop::{THUMBNAILS, Thumbnailer};

#[tokio::main]
async fn main() -> ExitCode {
    conejo::cli::main(|conejo| {
        conejo
            .connection_name("thumbnail-service")
            .queue(THUMBNAILS, Blocking::new(Thumbnailer))
    })
    .await
}
