//! The coalescing writer that terminal sessions, acquirer links and HSM connections share.

use futures_util::{Sink, SinkExt};
use tokio::sync::mpsc;

/// Writes `first` and everything already queued behind it, then flushes once: what is ready
/// together leaves in one write (one system call, one TCP segment where it fits).
///
/// # Errors
/// The sink's, as soon as a write fails.
pub(crate) async fn write_coalesced<S, T>(
    sink: &mut S,
    first: T,
    queue: &mut mpsc::Receiver<T>,
) -> Result<(), S::Error>
where
    S: Sink<T> + Unpin,
{
    sink.feed(first).await?;
    while let Ok(more) = queue.try_recv() {
        sink.feed(more).await?;
    }
    SinkExt::<T>::flush(sink).await
}
