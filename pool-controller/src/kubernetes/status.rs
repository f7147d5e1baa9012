//! Reports one pool on its `InferencePool`: the status subresource, written with server-side
//! apply under the controller's field manager whenever the counts, the targets or the reason
//! change; and Kubernetes Events for scale decisions (`ScaledUp`, `ScaledDown`) and executor
//! failures (`ExecutorFailed`), which `kubectl describe inferencepool` shows.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use tokio::sync::watch;

use crate::crd::{ClassCounts, Decision, InferencePool, InferencePoolStatus, PhaseCounts};
use crate::provider::kubernetes::FIELD_MANAGER;
use crate::reconciler::PoolStatus;

/// Follows the reconciler's status until the pool stops. `rejected` holds why the pool's newest
/// spec was refused (this reconciler goes on with the previous one), `None` while it is the
/// newest.
pub async fn report(
    api: Api<InferencePool>,
    recorder: Recorder,
    pool: ObjectReference,
    generation: Option<i64>,
    mut status: watch::Receiver<PoolStatus>,
    mut rejected: watch::Receiver<Option<String>>,
) {
    let name = pool.name.clone().unwrap_or_default();
    let mut written: Option<InferencePoolStatus> = None;
    let mut seen: Option<PoolStatus> = None;
    loop {
        let now = status.borrow_and_update().clone();
        let problem = rejected.borrow_and_update().clone();
        let next = pool_status(&now, generation, problem.as_deref(), written.as_ref());
        if written.as_ref() != Some(&next) {
            match apply(&api, &name, &next).await {
                Ok(()) => written = Some(next),
                // Retried on the next change (every tick at the latest).
                Err(e) => tracing::warn!(pool = %name, "writing the pool status: {e}"),
            }
        }
        for event in events(seen.as_ref(), &now) {
            if let Err(e) = recorder.publish(&event, &pool).await {
                tracing::warn!(pool = %name, reason = %event.reason, "publishing an event: {e}");
            }
        }
        seen = Some(now);
        tokio::select! {
            changed = status.changed() => if changed.is_err() { return },
            changed = rejected.changed() => if changed.is_err() { return },
        }
    }
}

/// Server-side apply of the status subresource (forced: this controller owns the status).
pub async fn apply(
    api: &Api<InferencePool>,
    name: &str,
    status: &InferencePoolStatus,
) -> Result<(), kube::Error> {
    let patch = serde_json::json!({
        "apiVersion": "llmctl.io/v1alpha1",
        "kind": "InferencePool",
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map(|_| ())
}

/// The resource's status from the reconciler's: counts, targets, and two conditions, `Ready`
/// (any executor serving) and `Accepted` (the newest spec is the one running; `False, reason
/// InvalidSpec` with `rejected`'s message when it was refused). Each keeps its transition time
/// while its status does not change.
pub fn pool_status(
    s: &PoolStatus,
    generation: Option<i64>,
    rejected: Option<&str>,
    previous: Option<&InferencePoolStatus>,
) -> InferencePoolStatus {
    let phases = |class: &str| {
        let mut c = PhaseCounts::default();
        for e in s.executors.iter().filter(|e| e.class == class) {
            match e.phase {
                "starting" => c.starting += 1,
                "ready" => c.ready += 1,
                "draining" => c.draining += 1,
                _ => {}
            }
        }
        c
    };
    let classes = ClassCounts {
        warm: phases("warm"),
        ephemeral: phases("ephemeral"),
    };
    let last_decision = s.last_reason.map(|reason| {
        let same = |d: &&Decision| {
            (d.desired_warm, d.desired_ephemeral, d.reason.as_str())
                == (s.desired_warm, s.desired_ephemeral, reason)
        };
        Decision {
            desired_warm: s.desired_warm,
            desired_ephemeral: s.desired_ephemeral,
            reason: reason.to_owned(),
            // Since when these targets hold: carried over while they do.
            time: previous
                .and_then(|p| p.last_decision.as_ref())
                .filter(same)
                .map_or_else(|| Time(Timestamp::now()), |d| d.time.clone()),
        }
    });
    let desired = s.desired_warm + s.desired_ephemeral;
    let (ready, reason, message) = if s.ready > 0 {
        (
            "True",
            "ExecutorsReady",
            format!("{} executors ready", s.ready),
        )
    } else if desired == 0 {
        ("False", "ScaledToZero", "no executors wanted".to_owned())
    } else {
        (
            "False",
            "NoReadyExecutors",
            format!("{desired} executors wanted, {} starting", s.starting),
        )
    };
    InferencePoolStatus {
        warm: classes.warm.starting + classes.warm.ready,
        ephemeral: classes.ephemeral.starting + classes.ephemeral.ready,
        ready: s.ready,
        starting: s.starting,
        draining: s.draining,
        desired,
        classes,
        last_decision,
        last_reason: s.last_reason.map(str::to_owned),
        observed_generation: generation,
        conditions: vec![
            condition(previous, "Ready", ready, reason, message, generation),
            accepted(previous, rejected, generation),
        ],
    }
}

/// The `Accepted` condition: `True` unless the newest spec was refused (`rejected` says why).
pub fn accepted(
    previous: Option<&InferencePoolStatus>,
    rejected: Option<&str>,
    generation: Option<i64>,
) -> Condition {
    match rejected {
        None => condition(
            previous,
            "Accepted",
            "True",
            "SpecValid",
            "the spec is running".to_owned(),
            generation,
        ),
        Some(why) => condition(
            previous,
            "Accepted",
            "False",
            "InvalidSpec",
            why.to_owned(),
            generation,
        ),
    }
}

/// A condition; its transition time is carried over from `previous` when its status is the same.
pub fn condition(
    previous: Option<&InferencePoolStatus>,
    kind: &str,
    status: &str,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    let since = previous
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == kind))
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(Timestamp::now()));
    Condition {
        type_: kind.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        last_transition_time: since,
        observed_generation: generation,
    }
}

/// Events for what changed between two statuses: a new target, new failures.
fn events(before: Option<&PoolStatus>, now: &PoolStatus) -> Vec<Event> {
    let mut out = Vec::new();
    let desired = |s: &PoolStatus| s.desired_warm + s.desired_ephemeral;
    if let Some(before) = before {
        if desired(before) != desired(now) {
            let up = desired(now) > desired(before);
            out.push(Event {
                type_: EventType::Normal,
                reason: if up { "ScaledUp" } else { "ScaledDown" }.to_owned(),
                note: Some(format!(
                    "{} -> {} executors (warm {}, ephemeral {}): {}",
                    desired(before),
                    desired(now),
                    now.desired_warm,
                    now.desired_ephemeral,
                    now.last_reason.unwrap_or("")
                )),
                action: "Scale".to_owned(),
                secondary: None,
            });
        }
        if now.failures > before.failures {
            out.push(Event {
                type_: EventType::Warning,
                reason: "ExecutorFailed".to_owned(),
                note: now.last_failure.clone(),
                action: "Replace".to_owned(),
                secondary: None,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconciler::ExecutorInfo;

    fn executor(class: &'static str, phase: &'static str) -> ExecutorInfo {
        ExecutorInfo {
            id: format!("p-{class}-{phase}"),
            class,
            phase,
            endpoint: None,
            pid: None,
            age_secs: 0.0,
            cold_start_secs: None,
            in_flight: 0,
            running: None,
            waiting: None,
            kv_used: None,
            reason: None,
        }
    }

    #[test]
    fn status_counts_classes_and_keeps_the_transition_time_while_ready_holds() {
        let s = PoolStatus {
            ready: 1,
            starting: 1,
            desired_warm: 1,
            desired_ephemeral: 2,
            last_reason: Some("stable"),
            executors: vec![
                executor("warm", "ready"),
                executor("ephemeral", "starting"),
                executor("ephemeral", "draining"),
                executor("ephemeral", "terminated"),
            ],
            ..PoolStatus::default()
        };
        let first = pool_status(&s, Some(3), None, None);
        assert_eq!((first.warm, first.ephemeral, first.desired), (1, 1, 3));
        let ready_starting_draining = |c: &PhaseCounts| (c.ready, c.starting, c.draining);
        assert_eq!(ready_starting_draining(&first.classes.warm), (1, 0, 0));
        assert_eq!(ready_starting_draining(&first.classes.ephemeral), (0, 1, 1));
        let decision = first.last_decision.clone().unwrap();
        assert_eq!(
            (
                decision.desired_warm,
                decision.desired_ephemeral,
                decision.reason.as_str()
            ),
            (1, 2, "stable")
        );
        assert_eq!(first.conditions[0].status, "True");
        let mut old = first.clone();
        old.conditions[0].last_transition_time = Time(Timestamp::UNIX_EPOCH);
        old.last_decision.as_mut().unwrap().time = Time(Timestamp::UNIX_EPOCH);
        let again = pool_status(&s, Some(3), None, Some(&old));
        assert_eq!(again, old, "an unchanged pool writes nothing new");
        let down = PoolStatus {
            ready: 0,
            ..s.clone()
        };
        let changed = pool_status(&down, Some(3), None, Some(&old));
        assert_eq!(changed.conditions[0].reason, "NoReadyExecutors");
        assert_ne!(
            changed.conditions[0].last_transition_time,
            old.conditions[0].last_transition_time
        );
        assert_eq!(
            changed.conditions[1], old.conditions[1],
            "Accepted holds while the spec does"
        );
        let rescaled = PoolStatus {
            desired_ephemeral: 3,
            last_reason: Some("panic"),
            ..s.clone()
        };
        let next = pool_status(&rescaled, Some(3), None, Some(&old));
        let decision = next.last_decision.unwrap();
        assert_eq!(
            (decision.desired_ephemeral, decision.reason.as_str()),
            (3, "panic")
        );
        assert_ne!(
            decision.time,
            old.last_decision.as_ref().unwrap().time,
            "a new decision, a new time"
        );

        // A refused newer spec: the running pool still reports, and says why it was refused.
        let refused = pool_status(
            &s,
            Some(3),
            Some("spec.model: must not be empty"),
            Some(&old),
        );
        assert_eq!(refused.conditions[0], old.conditions[0]);
        assert_eq!(
            (
                refused.conditions[1].status.as_str(),
                refused.conditions[1].reason.as_str()
            ),
            ("False", "InvalidSpec")
        );
        assert_eq!(
            refused.conditions[1].message,
            "spec.model: must not be empty"
        );
    }

    #[test]
    fn events_say_which_way_it_scaled_and_what_failed() {
        let before = PoolStatus {
            desired_warm: 1,
            ..PoolStatus::default()
        };
        let now = PoolStatus {
            desired_warm: 1,
            desired_ephemeral: 2,
            failures: 1,
            last_failure: Some("p-warm-1: Failed: OOMKilled, exit code 137".into()),
            last_reason: Some("scale_up"),
            ..PoolStatus::default()
        };
        let ev = events(Some(&before), &now);
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[0].reason, "ScaledUp");
        assert_eq!(
            ev[0].note.as_deref(),
            Some("1 -> 3 executors (warm 1, ephemeral 2): scale_up")
        );
        assert!(matches!(ev[1].type_, EventType::Warning));
        assert!(ev[1].note.as_deref().unwrap().contains("OOMKilled"));
        assert!(
            events(None, &now).is_empty(),
            "the first look is not a change"
        );
        assert!(events(Some(&now), &now).is_empty());
    }
}
