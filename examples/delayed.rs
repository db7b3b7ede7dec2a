//! Delayed messages: reminders published now to arrive later (`Publisher::publish_after` and
//! `publish_at`). Each arrives when it is due, not before, in due-time order whatever the
//! order it was published in, once.
//!
//! In memory by default; on Redis when `STREAMWISE_URL` (or `REDIS_URL`) is set. NATS has no
//! delayed publish yet: the example says so and stops.
//!
//! ```sh
//! cargo run --example delayed
//! STREAMWISE_URL=redis://127.0.0.1:6379 cargo run --example delayed
//! ```

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use streamwise::prelude::*;

#[derive(Debug, Serialize, Deserialize)]
struct Reminder {
    text: String,
    /// When it is due, in ms since the epoch, to show how late it came.
    due_ms: u64,
}

fn ms_since_epoch(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[tokio::main]
async fn main() -> streamwise::Result<()> {
    let url = streamwise::url_from_env().unwrap_or_else(|| "memory://".to_owned());
    let backend = streamwise::connect(&url).await?;
    println!("Using {} at {}", backend.kind(), backend.location()); // a password shown as ***
    let (publisher, subscriber) = (backend.publisher(), backend.subscriber());

    // From now on: a rerun on Redis does not see an earlier run's reminders again.
    let options = SubscribeOptions::new("reminders", "worker-1").start_from(StartFrom::Latest);
    let mut reminders = subscriber.subscribe("reminders", options).await?;

    // Published latest-due first: they still arrive in due-time order.
    let now = SystemTime::now();
    let plan = [
        ("send the invoice", Duration::from_millis(900)),
        ("call the customer", Duration::from_millis(600)),
        ("check the stock", Duration::from_millis(300)),
    ];
    for (text, delay) in plan {
        let reminder = Reminder {
            text: text.into(),
            due_ms: ms_since_epoch(now + delay),
        };
        match publisher
            .publish_after("reminders", delay, Message::new("reminder", &reminder)?)
            .await
        {
            Ok(()) => println!("Scheduled: {text} in {} ms", delay.as_millis()),
            Err(Error::Unsupported(what)) => {
                println!("This backend has no {what}; run it in memory or on Redis");
                return Err(Error::Unsupported(what));
            }
            Err(e) => return Err(e),
        }
    }
    // And one at a given time.
    let at = now + Duration::from_millis(1_200);
    let reminder = Reminder {
        text: "close the day".into(),
        due_ms: ms_since_epoch(at),
    };
    publisher
        .publish_at("reminders", at, Message::new("reminder", &reminder)?)
        .await?;
    println!("Scheduled: close the day at +1200 ms");

    let mut previous_due = 0;
    for _ in 0..plan.len() + 1 {
        let delivery = tokio::time::timeout(Duration::from_secs(30), reminders.next())
            .await
            .map_err(|_| Error::invalid("reminders", "not all reminders came within 30 s"))?
            .ok_or_else(|| Error::invalid("reminders", "the subscription ended"))??;
        let reminder: Reminder = delivery.message().decode()?;
        let late = ms_since_epoch(SystemTime::now()).saturating_sub(reminder.due_ms);
        assert!(reminder.due_ms >= previous_due, "out of due-time order");
        previous_due = reminder.due_ms;
        println!("Due: {} ({late} ms after its time)", reminder.text);
        delivery.ack().await?;
    }
    subscriber.close().await?;
    println!("All reminders came when due, in due-time order");
    Ok(())
}
