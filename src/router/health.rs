//! The health of a router and of each of its subscriptions ([`RouterHealth`]), for readiness
//! and liveness checks. The library serves no HTTP: an application answers its `/readyz` from
//! [`RouterHealth::overall`].

use std::sync::{Arc, Mutex};

use crate::pubsub::{HealthHandle, SubscriptionHealth};

/// The health of a router, or of one of its subscriptions.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Health {
    /// Not started yet: subscribing.
    Starting,
    /// Running as it should.
    Ready,
    /// Running, but not reading as it should (a read not answered in time, reconnecting, a
    /// lease it cannot renew); it keeps trying.
    Degraded {
        /// What is wrong (for the router: the first degraded subscription's topic and reason).
        reason: String,
    },
    /// Shutting down: fetching stopped, in-flight handlers finishing, flushing.
    Stopping,
    /// Shut down.
    Stopped,
    /// A subscription ended by itself (the router stops; see
    /// [`RunningRouter::failed`](super::RunningRouter::failed)), or the start failed.
    Failed {
        /// Why.
        reason: String,
    },
}

impl Health {
    /// Whether this is [`Health::Ready`]: what a readiness check answers.
    pub fn is_ready(&self) -> bool {
        *self == Health::Ready
    }
}

/// The health of one subscription of a router.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscriptionReport {
    /// The topic.
    pub topic: String,
    /// The consumer group.
    pub group: String,
    /// Its health.
    pub health: Health,
}

#[derive(Debug)]
enum Phase {
    Starting,
    Running,
    Stopping,
    Stopped,
    Failed(String),
}

struct Watched {
    topic: String,
    group: String,
    probe: HealthHandle,
    ended: Option<String>,
}

struct State {
    phase: Phase,
    subscriptions: Vec<Watched>,
}

/// A router's health, cheap to clone and to read: from [`Router::health`](super::Router::health)
/// before it starts, or [`RunningRouter::health`](super::RunningRouter::health).
#[derive(Clone)]
pub struct RouterHealth(Arc<Mutex<State>>);

impl std::fmt::Debug for RouterHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("RouterHealth").field(&self.overall()).finish()
    }
}

impl Default for RouterHealth {
    fn default() -> Self {
        RouterHealth(Arc::new(Mutex::new(State {
            phase: Phase::Starting,
            subscriptions: Vec::new(),
        })))
    }
}

impl RouterHealth {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The router's health: its phase, and while it runs the worst of its subscriptions'
    /// (failed before degraded).
    pub fn overall(&self) -> Health {
        let state = self.state();
        match &state.phase {
            Phase::Starting => Health::Starting,
            Phase::Stopping => Health::Stopping,
            Phase::Stopped => Health::Stopped,
            Phase::Failed(reason) => Health::Failed {
                reason: reason.clone(),
            },
            Phase::Running => {
                if let Some(w) = state.subscriptions.iter().find(|w| w.ended.is_some()) {
                    return Health::Failed {
                        reason: format!("{}: {}", w.topic, w.ended.as_deref().unwrap_or_default()),
                    };
                }
                for w in &state.subscriptions {
                    if let SubscriptionHealth::Degraded { reason } = w.probe.health() {
                        return Health::Degraded {
                            reason: format!("{}: {reason}", w.topic),
                        };
                    }
                }
                Health::Ready
            }
        }
    }

    /// Each subscription's health.
    pub fn subscriptions(&self) -> Vec<SubscriptionReport> {
        let state = self.state();
        let phase = match &state.phase {
            Phase::Starting => Some(Health::Starting),
            Phase::Stopping => Some(Health::Stopping),
            Phase::Stopped => Some(Health::Stopped),
            Phase::Failed(reason) => Some(Health::Failed {
                reason: reason.clone(),
            }),
            Phase::Running => None,
        };
        state
            .subscriptions
            .iter()
            .map(|w| SubscriptionReport {
                topic: w.topic.clone(),
                group: w.group.clone(),
                health: match (&phase, &w.ended) {
                    (_, Some(reason)) => Health::Failed {
                        reason: reason.clone(),
                    },
                    (Some(phase), None) => phase.clone(),
                    (None, None) => match w.probe.health() {
                        SubscriptionHealth::Ready => Health::Ready,
                        SubscriptionHealth::Degraded { reason } => Health::Degraded { reason },
                    },
                },
            })
            .collect()
    }

    pub(crate) fn watch(&self, topic: &str, group: &str, probe: HealthHandle) {
        self.state().subscriptions.push(Watched {
            topic: topic.to_owned(),
            group: group.to_owned(),
            probe,
            ended: None,
        });
    }

    pub(crate) fn running(&self) {
        self.state().phase = Phase::Running;
    }

    pub(crate) fn start_failed(&self, reason: String) {
        self.state().phase = Phase::Failed(reason);
    }

    /// The subscription to `topic` ended by itself.
    pub(crate) fn ended(&self, topic: &str, reason: &str) {
        let mut state = self.state();
        if let Some(w) = state
            .subscriptions
            .iter_mut()
            .find(|w| w.topic == topic && w.ended.is_none())
        {
            w.ended = Some(reason.to_owned());
        }
    }

    pub(crate) fn stopping(&self) {
        self.state().phase = Phase::Stopping;
    }

    pub(crate) fn stopped(&self) {
        self.state().phase = Phase::Stopped;
    }
}
