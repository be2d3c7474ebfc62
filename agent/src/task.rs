//! Owned background tasks: every long-running task of a subsystem is a [`Task`]
//! that its owner can stop and whose error (or panic) comes back to it, instead
//! of a `tokio::spawn` whose result nobody sees.
//!
//! The shape is chitchat's `ChitchatHandle` and linkerd's drain: a subsystem's
//! `spawn` returns a value holding its [`Task`]s; `app` stops them in order with
//! [`Task::shutdown`] under one deadline and logs what did not finish.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Why a task did not end cleanly.
#[derive(Debug, thiserror::Error)]
pub enum TaskError<E: std::error::Error + 'static> {
    /// The task returned an error.
    #[error(transparent)]
    Failed(E),
    /// The task panicked: a bug (the message is in the log).
    #[error("task {name} panicked (a bug: please report it with the log)")]
    Panicked { name: &'static str },
    /// It did not stop within the deadline given to [`Task::shutdown_within`].
    #[error("task {name} did not stop within {after:?}")]
    Timeout { name: &'static str, after: Duration },
}

impl<E: std::error::Error + 'static> TaskError<E> {
    /// The task's own error, if that is why it ended.
    pub fn into_failed(self) -> Option<E> {
        match self {
            TaskError::Failed(e) => Some(e),
            _ => None,
        }
    }
}

/// A spawned task, its cancellation token and its outcome.
#[derive(Debug)]
pub struct Task<E> {
    name: &'static str,
    cancel: CancellationToken,
    join: JoinHandle<Result<(), E>>,
}

impl<E: std::error::Error + Send + 'static> Task<E> {
    /// Spawns `run(cancel)` inside `span`; the task must end soon after `cancel`
    /// fires.
    pub fn spawn<F, Fut>(name: &'static str, span: tracing::Span, cancel: CancellationToken, run: F) -> Self
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
    {
        let join = tokio::spawn(run(cancel.clone()).instrument(span));
        Task { name, cancel, join }
    }

    /// The task's name (for logs).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The token that stops it.
    pub fn cancel_token(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Whether it has ended (on its own, or after a stop).
    pub fn is_finished(&self) -> bool {
        self.join.is_finished()
    }

    /// Asks the task to stop and waits for it; returns its error.
    pub async fn shutdown(self) -> Result<(), TaskError<E>> {
        self.cancel.cancel();
        Self::outcome(self.name, self.join.await)
    }

    /// [`Task::shutdown`], giving up (and aborting the task) after `after`.
    pub async fn shutdown_within(self, after: Duration) -> Result<(), TaskError<E>> {
        self.cancel.cancel();
        let name = self.name;
        let mut join = self.join;
        match tokio::time::timeout(after, &mut join).await {
            Ok(result) => Self::outcome(name, result),
            Err(_) => {
                join.abort();
                Err(TaskError::Timeout { name, after })
            }
        }
    }

    /// Waits for the task to end on its own (it is not asked to stop).
    pub async fn join(self) -> Result<(), TaskError<E>> {
        Self::outcome(self.name, self.join.await)
    }

    fn outcome(name: &'static str, result: Result<Result<(), E>, tokio::task::JoinError>) -> Result<(), TaskError<E>> {
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(TaskError::Failed(e)),
            Err(e) if e.is_panic() => Err(TaskError::Panicked { name }),
            // Aborted: only shutdown_within aborts, and it reports a timeout itself.
            Err(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("boom")]
    struct Boom;

    #[tokio::test]
    async fn shutdown_returns_the_tasks_error_and_reports_panics() {
        let ok: Task<Boom> = Task::spawn("ok", tracing::Span::none(), CancellationToken::new(), |c| async move {
            c.cancelled().await;
            Ok(())
        });
        assert!(ok.shutdown().await.is_ok());
        let failed: Task<Boom> = Task::spawn("failed", tracing::Span::none(), CancellationToken::new(), |_| async { Err(Boom) });
        assert!(matches!(failed.shutdown().await, Err(TaskError::Failed(Boom))));
        let panics: Task<Boom> = Task::spawn("panics", tracing::Span::none(), CancellationToken::new(), |_| async {
            panic!("on purpose");
        });
        assert!(matches!(panics.shutdown().await, Err(TaskError::Panicked { name: "panics" })));
        let stuck: Task<Boom> = Task::spawn("stuck", tracing::Span::none(), CancellationToken::new(), |_| async {
            std::future::pending::<()>().await;
            Ok(())
        });
        let r = stuck.shutdown_within(Duration::from_millis(20)).await;
        assert!(matches!(r, Err(TaskError::Timeout { name: "stuck", .. })), "{r:?}");
    }
}
