//! One task per group member for the flushers of its partitions. A member that owns 16
//! partitions has 16 flushers; as 16 tasks, every round of acks woke 16 tasks, each scheduled
//! on its own and each a chance for the runtime to wake a parked worker thread (a futex call
//! each). Polled inside one task, the flushers that woke together run in one turn of that task,
//! and their ack writes reach the connection together.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use crate::lock;

/// A member: its group and its name.
type MemberKey = (String, String);

type Work = BoxFuture<'static, ()>;

/// The running member tasks of one subscriber, by member.
#[derive(Clone, Default)]
pub(super) struct MemberTasks {
    running: Arc<Mutex<HashMap<MemberKey, mpsc::UnboundedSender<Work>>>>,
}

impl MemberTasks {
    /// Runs `work` in the task of `member` of `group`, started on `tasks` when it has none.
    pub(super) fn run(
        &self,
        tasks: &TaskTracker,
        group: &str,
        member: &str,
        work: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let key = (group.to_owned(), member.to_owned());
        let mut work: Work = Box::pin(work);
        let mut running = lock(&self.running);
        if let Some(task) = running.get(&key) {
            match task.send(work) {
                Ok(()) => return,
                // Its task was dropped without taking its entry out (its runtime shut down):
                // start another.
                Err(mpsc::error::SendError(back)) => work = back,
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(work);
        running.insert(key.clone(), tx);
        tasks.spawn(member_task(key, self.running.clone(), rx));
    }

    /// No more work comes: each member task ends when its work is done.
    pub(super) fn close(&self) {
        lock(&self.running).clear();
    }
}

/// Runs the work sent to one member until all of it is done and none is coming.
async fn member_task(
    key: MemberKey,
    running: Arc<Mutex<HashMap<MemberKey, mpsc::UnboundedSender<Work>>>>,
    mut incoming: mpsc::UnboundedReceiver<Work>,
) {
    let mut work = FuturesUnordered::new();
    let mut open = true;
    loop {
        tokio::select! {
            next = incoming.recv(), if open => match next {
                Some(next) => work.push(isolated(next)),
                None => open = false,
            },
            Some(()) = work.next(), if !work.is_empty() => {}
            else => return,
        }
        if open && work.is_empty() {
            // Nothing left: retire, unless work was sent meanwhile. Under the lock that
            // senders hold, so that nothing is sent to a task that has ended.
            let mut running = lock(&running);
            match incoming.try_recv() {
                Ok(next) => work.push(isolated(next)),
                Err(mpsc::error::TryRecvError::Empty) => {
                    running.remove(&key);
                    return;
                }
                // Taken out by `close` already (the entry there now may be another task's).
                Err(mpsc::error::TryRecvError::Disconnected) => return,
            }
        }
    }
}

/// `work`, whose panic ends only itself, not the member's other work.
fn isolated(work: Work) -> BoxFuture<'static, ()> {
    Box::pin(AssertUnwindSafe(work).catch_unwind().map(|done| {
        if done.is_err() {
            tracing::error!("a flusher panicked; its subscription's acks are no longer written");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    /// Work that reports the task it runs in, then waits for `go`.
    async fn reporting(id: oneshot::Sender<tokio::task::Id>, go: oneshot::Receiver<()>) {
        let _ = id.send(tokio::task::id());
        let _ = go.await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_members_work_shares_one_task_and_other_members_have_their_own() {
        let (tasks, members) = (TaskTracker::new(), MemberTasks::default());
        let (mut ids, mut gos) = (Vec::new(), Vec::new());
        for member in ["a", "a", "b"] {
            let (id_tx, id_rx) = oneshot::channel();
            let (go_tx, go_rx) = oneshot::channel();
            members.run(&tasks, "g", member, reporting(id_tx, go_rx));
            ids.push(id_rx.await.unwrap());
            gos.push(go_tx);
        }
        assert_eq!(ids[0], ids[1], "two partitions of member a");
        assert_ne!(ids[0], ids[2], "member b");
        for go in gos {
            go.send(()).unwrap();
        }
        members.close();
        tasks.close();
        tasks.wait().await;
    }

    #[tokio::test]
    async fn a_member_task_ends_with_its_work_and_a_new_one_starts_for_more() {
        let (tasks, members) = (TaskTracker::new(), MemberTasks::default());
        let (id_tx, id_rx) = oneshot::channel();
        members.run(&tasks, "g", "a", async move {
            let _ = id_tx.send(tokio::task::id());
        });
        let first = id_rx.await.unwrap();
        // The task retires once its only work is done.
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while !tasks.is_empty() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the member task ends when its work is done");
        assert!(lock(&members.running).is_empty());
        let (id_tx, id_rx) = oneshot::channel();
        members.run(&tasks, "g", "a", async move {
            let _ = id_tx.send(tokio::task::id());
        });
        assert_ne!(id_rx.await.unwrap(), first);
        tasks.close();
        tasks.wait().await;
    }

    #[tokio::test]
    async fn a_panic_ends_only_the_work_that_panicked() {
        let (tasks, members) = (TaskTracker::new(), MemberTasks::default());
        let (go_tx, go_rx) = oneshot::channel::<()>();
        let (done_tx, done_rx) = oneshot::channel();
        members.run(&tasks, "g", "a", async move {
            let _ = go_rx.await;
            let _ = done_tx.send(());
        });
        let (panicking_tx, panicking_rx) = oneshot::channel();
        members.run(&tasks, "g", "a", async move {
            let _ = panicking_tx.send(());
            panic!("a flusher's bug");
        });
        // The panic happens in the poll that sent this, in the task the first work runs in:
        // that work is polled again only after it.
        panicking_rx.await.unwrap();
        go_tx.send(()).unwrap();
        done_rx.await.expect("the other work ran to its end");
        members.close();
        tasks.close();
        tasks.wait().await;
    }
}
