//! Shutdown coordination shared by the server and background workers.

use tokio::sync::watch;

/// Triggers shutdown of everything holding a [`ShutdownSignal`].
#[derive(Clone, Debug)]
pub struct Shutdown {
    tx: watch::Sender<bool>,
}

/// Resolves when shutdown is triggered.
#[derive(Clone, Debug)]
pub struct ShutdownSignal {
    rx: watch::Receiver<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A new, untriggered shutdown.
    pub fn new() -> Self {
        Self { tx: watch::channel(false).0 }
    }

    /// Triggers it (idempotent).
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    /// A signal to wait on.
    pub fn signal(&self) -> ShutdownSignal {
        ShutdownSignal { rx: self.tx.subscribe() }
    }

    /// Whether it was triggered.
    pub fn is_triggered(&self) -> bool {
        *self.tx.borrow()
    }
}

impl ShutdownSignal {
    /// Waits until shutdown is triggered.
    pub async fn wait(mut self) {
        // An Err means the sender is gone, which also means shutting down.
        let _ = self.rx.wait_for(|v| *v).await;
    }

    /// Whether shutdown was triggered.
    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow()
    }

    /// Sleeps for `d` unless shutdown comes first; returns false on shutdown.
    pub async fn sleep(&self, d: std::time::Duration) -> bool {
        let me = self.clone();
        tokio::select! {
            _ = tokio::time::sleep(d) => !self.is_triggered(),
            _ = me.wait() => false,
        }
    }
}
