//! The controller on Kubernetes against a fake API server (`fake_api`, a test double: no API
//! server can run here). Each scenario runs the real pool sync, reconcilers, Kubernetes
//! provider, status reporter and leader election through a real `kube::Client`, plays the
//! scheduler and kubelet by editing pods, and states the API calls it expects, each with a
//! timeout. Time runs on tokio's paused clock, so TTLs and lease durations pass at once.

mod fake_api;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use fake_api::{
    EVENTS, FakeApi, LEASES, NS, PODS, POOLS, Recorded, make_failed, make_ready, make_scheduled,
    make_unschedulable,
};
use kube::Api;
use kube::runtime::events::{Recorder, Reporter};
use llmctl_pool_controller::controller::Controller;
use llmctl_pool_controller::kubernetes::leader::{Attempt, Elector, LeaderConfig};
use llmctl_pool_controller::kubernetes::pools::Pools;
use llmctl_pool_controller::reconciler::PoolStatus;
use llmctl_protocol::control::{DemandReport, PoolDemand};
use serde_json::{Value, json};
use tokio::time::Instant;

const SECS: fn(u64) -> Duration = Duration::from_secs;

fn pool(name: &str, scaling: Value) -> Value {
    json!({
        "apiVersion": "llmctl.io/v1alpha1",
        "kind": "InferencePool",
        "metadata": {"name": name},
        "spec": {
            "model": "/models/tiny",
            "executor": {"image": "llmctl/worker:test", "drainGraceSecs": 20, "startupTimeoutSecs": 30},
            "scaling": scaling,
        },
    })
}

/// A pod of ours as a previous leader would have left it.
fn existing_pod(name: &str, pool: &str, class: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"llmctl.io/pool": pool, "llmctl.io/class": class}},
        "spec": {"containers": [{"name": "executor", "image": "llmctl/worker:test"}]},
    })
}

/// The leader's pool sync running against the fake.
fn start(client: kube::Client) -> Arc<Controller> {
    let controller = Controller::new(SECS(10));
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "llmctl-controller".into(),
            instance: Some("test".into()),
        },
    );
    let pools = Pools::new(
        client,
        NS.into(),
        controller.clone(),
        recorder,
        Duration::from_millis(200),
    );
    tokio::spawn(pools.run());
    controller
}

/// Polls `check` until it gives a value; panics naming `what` after `within`.
async fn wait_for<T>(what: &str, within: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn pool_status(c: &Controller, name: &str) -> Option<PoolStatus> {
    c.pool(name)
}

fn creates_pod(r: &Recorded, class: &str) -> bool {
    r.method == "POST" && r.path == PODS && r.body["metadata"]["labels"]["llmctl.io/class"] == class
}

fn deletes_pod(r: &Recorded, name: &str) -> bool {
    r.method == "DELETE" && r.path == format!("{PODS}/{name}")
}

fn posts_event(r: &Recorded, reason: &str) -> bool {
    r.method == "POST" && r.path == EVENTS && r.body["reason"] == reason
}

fn report(controller: &Controller, pool: &str, queued: u32, endpoints: &[&str]) {
    controller
        .report(DemandReport {
            gateway: "gw-1".into(),
            pools: vec![PoolDemand {
                pool: pool.into(),
                queued,
                in_flight: 0,
                endpoints: endpoints
                    .iter()
                    .map(|e| (e.to_string(), 0))
                    .collect::<HashMap<_, _>>(),
                ..PoolDemand::default()
            }],
        })
        .expect("the pool is known");
}

#[tokio::test(start_paused = true)]
async fn a_new_pool_gets_warm_pods_it_owns_and_its_status_is_applied_server_side() {
    let (fake, client) = FakeApi::start();
    fake.create_object(POOLS, pool("chat", json!({"minWarm": 2, "maxReplicas": 4})));
    let uid = fake.get(POOLS, "chat").unwrap()["metadata"]["uid"].clone();
    let controller = start(client);

    let created = fake
        .expect(0, SECS(10), "a warm pod created", |r| {
            creates_pod(r, "warm")
        })
        .await;
    let pod = &created.body;
    assert_eq!(pod["metadata"]["labels"]["llmctl.io/pool"], "chat");
    let owner = &pod["metadata"]["ownerReferences"][0];
    assert_eq!(
        (&owner["kind"], &owner["uid"], &owner["controller"]),
        (&json!("InferencePool"), &uid, &json!(true))
    );
    let args = pod["spec"]["containers"][0]["args"].as_array().unwrap();
    assert!(
        args.windows(2)
            .any(|w| w == [json!("--model"), json!("/models/tiny")]),
        "{args:?}"
    );
    assert_eq!(pod["spec"]["terminationGracePeriodSeconds"], 20);

    let names = wait_for("two warm pods", SECS(10), || {
        let names = fake.names(PODS);
        (names.len() == 2).then_some(names)
    })
    .await;
    for (i, name) in names.iter().enumerate() {
        make_ready(&fake, name, &format!("10.0.0.{}", i + 1));
    }
    let endpoints = wait_for("two ready endpoints", SECS(10), || {
        let s = pool_status(&controller, "chat")?;
        (s.endpoints.len() == 2).then_some(s.endpoint_addresses().join(","))
    })
    .await;
    assert_eq!(endpoints, "10.0.0.1:8000,10.0.0.2:8000");

    let apply = fake
        .expect(0, SECS(10), "a status apply with ready=2", |r| {
            r.method == "PATCH"
                && r.path == format!("{POOLS}/chat/status")
                && r.body["status"]["ready"] == 2
        })
        .await;
    assert!(
        apply.content_type.starts_with("application/apply-patch"),
        "{}",
        apply.content_type
    );
    assert!(
        apply.query_has("fieldManager=llmctl-controller") && apply.query_has("force=true"),
        "{}",
        apply.query
    );
    let status = &fake.get(POOLS, "chat").unwrap()["status"];
    assert_eq!(
        (&status["warm"], &status["desired"]),
        (&json!(2), &json!(2))
    );
    assert_eq!(status["conditions"][0]["type"], "Ready");
    assert_eq!(status["conditions"][0]["status"], "True");

    let event = fake
        .expect(0, SECS(10), "a ScaledUp event", |r| {
            posts_event(r, "ScaledUp")
        })
        .await;
    assert_eq!(event.body["regarding"]["name"], "chat");
    assert_eq!(event.body["type"], "Normal");
}

#[tokio::test(start_paused = true)]
async fn ephemeral_pods_scale_up_with_demand_and_down_when_idle_and_other_pools_are_untouched() {
    let (fake, client) = FakeApi::start();
    // Another pool's terminal pod and a pod that is not ours at all.
    fake.create_object(PODS, existing_pod("other-warm-1", "other", "warm"));
    make_failed(&fake, "other-warm-1", "Error", 1);
    fake.create_object(
        PODS,
        json!({"metadata": {"name": "unrelated"}, "spec": {"containers": []}}),
    );
    fake.create_object(
        POOLS,
        pool(
            "chat",
            json!({"minWarm": 0, "maxReplicas": 2, "targetConcurrency": 1, "stableWindowSecs": 3,
                   "panicWindowSecs": 1, "idleTtlSecs": 5, "terminalTtlSecs": 1}),
        ),
    );
    let controller = start(client);
    wait_for("the pool registered", SECS(10), || {
        pool_status(&controller, "chat")
    })
    .await;
    let mark = fake.mark();
    tokio::time::sleep(SECS(5)).await;
    assert!(
        !fake.requests()[mark..]
            .iter()
            .any(|r| r.method == "POST" && r.path == PODS),
        "no demand, no pods"
    );

    report(&controller, "chat", 2, &[]);
    fake.expect(mark, SECS(10), "an ephemeral pod created", |r| {
        creates_pod(r, "ephemeral")
    })
    .await;
    let ours = wait_for("two ephemeral pods", SECS(10), || {
        let ours: Vec<String> = fake
            .names(PODS)
            .into_iter()
            .filter(|n| n.starts_with("chat-"))
            .collect();
        (ours.len() == 2).then_some(ours)
    })
    .await;
    for (i, name) in ours.iter().enumerate() {
        make_ready(&fake, name, &format!("10.0.1.{}", i + 1));
    }
    wait_for("two ready endpoints", SECS(10), || {
        (pool_status(&controller, "chat")?.ready == 2).then_some(())
    })
    .await;

    // The queue drained and both executors are idle: reaped with the drain grace.
    report(&controller, "chat", 0, &["10.0.1.1:8000", "10.0.1.2:8000"]);
    for name in &ours {
        let delete = fake
            .expect(mark, SECS(60), "an idle ephemeral pod deleted", |r| {
                deletes_pod(r, name)
            })
            .await;
        assert_eq!(delete.body["gracePeriodSeconds"], 20, "{:?}", delete.body);
    }
    tokio::time::sleep(SECS(30)).await;
    assert_eq!(fake.names(PODS), ["other-warm-1", "unrelated"]);
    let foreign: Vec<String> = fake
        .requests()
        .iter()
        .filter(|r| {
            r.method == "DELETE"
                && (r.path.ends_with("/other-warm-1") || r.path.ends_with("/unrelated"))
        })
        .map(|r| r.path.clone())
        .collect();
    assert!(
        foreign.is_empty(),
        "deleted pods of another pool: {foreign:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_pod_is_replaced_reported_and_removed_after_its_terminal_ttl() {
    let (fake, client) = FakeApi::start();
    fake.create_object(
        POOLS,
        pool(
            "chat",
            json!({"minWarm": 1, "maxReplicas": 1, "terminalTtlSecs": 30}),
        ),
    );
    let controller = start(client);
    fake.expect(0, SECS(10), "the warm pod", |r| creates_pod(r, "warm"))
        .await;
    make_ready(&fake, "chat-warm-1", "10.0.0.1");
    wait_for("ready", SECS(10), || {
        (pool_status(&controller, "chat")?.ready == 1).then_some(())
    })
    .await;

    let mark = fake.mark();
    make_failed(&fake, "chat-warm-1", "OOMKilled", 137);
    let failed_at = Instant::now();
    let replacement = fake
        .expect(mark, SECS(10), "a replacement warm pod", |r| {
            creates_pod(r, "warm")
        })
        .await;
    assert_eq!(replacement.body["metadata"]["name"], "chat-warm-2");
    let status = pool_status(&controller, "chat").unwrap();
    assert_eq!((status.failures, status.restarts), (1, 1));
    assert!(
        status
            .last_failure
            .as_deref()
            .unwrap()
            .contains("OOMKilled, exit code 137"),
        "{status:?}"
    );
    let warning = fake
        .expect(mark, SECS(10), "an ExecutorFailed event", |r| {
            posts_event(r, "ExecutorFailed")
        })
        .await;
    assert_eq!(warning.body["type"], "Warning");
    assert!(warning.body["note"].as_str().unwrap().contains("OOMKilled"));

    // Kept for `kubectl logs` until its TTL, then deleted.
    assert!(fake.get(PODS, "chat-warm-1").is_some());
    fake.expect(mark, SECS(60), "the terminal pod deleted", |r| {
        deletes_pod(r, "chat-warm-1")
    })
    .await;
    assert!(
        failed_at.elapsed() >= SECS(30),
        "deleted before its TTL: {:?}",
        failed_at.elapsed()
    );
    assert!(fake.get(PODS, "chat-warm-1").is_none());
    assert!(
        fake.get(PODS, "chat-warm-2").is_some(),
        "the replacement stays"
    );
}

#[tokio::test(start_paused = true)]
async fn an_unschedulable_pod_is_coming_capacity_but_a_scheduled_one_that_never_gets_ready_is_replaced()
 {
    let (fake, client) = FakeApi::start();
    fake.create_object(POOLS, pool("gpu", json!({"minWarm": 1, "maxReplicas": 1})));
    let controller = start(client);
    fake.expect(0, SECS(10), "the warm pod", |r| creates_pod(r, "warm"))
        .await;
    make_unschedulable(&fake, "gpu-warm-1");

    // Waiting for a GPU node far past the startup timeout (30 s): never churned.
    let mark = fake.mark();
    tokio::time::sleep(SECS(300)).await;
    let churn: Vec<String> = fake.requests()[mark..]
        .iter()
        .filter(|r| r.path.starts_with(PODS) && r.method != "GET")
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(churn.is_empty(), "{churn:?}");
    assert_eq!(pool_status(&controller, "gpu").unwrap().starting, 1);

    // Placed, but the image never starts: deleted after the startup timeout and replaced.
    make_scheduled(&fake, "gpu-warm-1");
    let scheduled_at = Instant::now();
    let delete = fake
        .expect(mark, SECS(60), "the late pod deleted", |r| {
            deletes_pod(r, "gpu-warm-1")
        })
        .await;
    assert_eq!(
        delete.body["gracePeriodSeconds"], 20,
        "a late pod gets the drain grace (it may hold a GPU): {:?}",
        delete.body
    );
    assert!(
        scheduled_at.elapsed() >= SECS(30),
        "{:?}",
        scheduled_at.elapsed()
    );
    let next = fake
        .expect(mark, SECS(30), "a replacement", |r| creates_pod(r, "warm"))
        .await;
    assert_eq!(next.body["metadata"]["name"], "gpu-warm-2");
}

#[tokio::test(start_paused = true)]
async fn a_new_leader_adopts_running_pods_and_a_spec_change_keeps_them() {
    let (fake, client) = FakeApi::start();
    fake.create_object(POOLS, pool("chat", json!({"minWarm": 1, "maxReplicas": 3})));
    fake.create_object(PODS, existing_pod("chat-warm-4", "chat", "warm"));
    make_ready(&fake, "chat-warm-4", "10.0.0.4");
    let controller = start(client);
    // Every endpoint set the controller publishes to gateways, from the start.
    let published = Arc::new(std::sync::Mutex::new(Vec::new()));
    tokio::spawn({
        let mut snapshots = controller.endpoints();
        let published = published.clone();
        async move {
            loop {
                let chat = snapshots
                    .borrow_and_update()
                    .pools
                    .get("chat")
                    .map(|set| set.iter().map(|e| e.address.clone()).collect::<Vec<_>>());
                published.lock().unwrap().push(chat);
                if snapshots.changed().await.is_err() {
                    return;
                }
            }
        }
    });

    let endpoints = wait_for("the adopted endpoint", SECS(10), || {
        let s = pool_status(&controller, "chat")?;
        (!s.endpoints.is_empty()).then(|| s.endpoint_addresses().join(","))
    })
    .await;
    assert_eq!(endpoints, "10.0.0.4:8000");
    assert_eq!(
        pool_status(&controller, "chat").unwrap().endpoints[0].name,
        "chat-warm-4"
    );
    tokio::time::sleep(SECS(5)).await;
    assert!(
        !fake
            .requests()
            .iter()
            .any(|r| r.method == "POST" && r.path == PODS),
        "the warm floor is met already"
    );

    // A spec edit (new generation) restarts the pool's reconciler, which adopts again.
    let mark = fake.mark();
    fake.update(POOLS, "chat", |p| {
        p["spec"]["scaling"]["minWarm"] = json!(2);
        p["metadata"]["generation"] = json!(2);
    });
    let created = fake
        .expect(mark, SECS(10), "a second warm pod", |r| {
            creates_pod(r, "warm")
        })
        .await;
    assert_eq!(
        created.body["metadata"]["name"], "chat-warm-5",
        "names continue after the adopted ones"
    );
    assert!(
        !fake.requests().iter().any(|r| r.method == "DELETE"),
        "nothing was deleted"
    );
    assert!(
        pool_status(&controller, "chat")
            .unwrap()
            .endpoint_addresses()
            .contains(&"10.0.0.4:8000")
    );
    fake.expect(mark, SECS(10), "status with the new generation", |r| {
        r.path == format!("{POOLS}/chat/status") && r.body["status"]["observedGeneration"] == 2
    })
    .await;
    // Gateways apply each published set as the pool's whole set: neither the first leader's
    // start nor the restart after the spec edit may publish the pool without its running pod.
    let published = published.lock().unwrap().clone();
    assert!(
        published
            .iter()
            .flatten()
            .all(|set| set.contains(&"10.0.0.4:8000".to_owned())),
        "{published:?}"
    );
    assert!(published.iter().flatten().count() > 0, "{published:?}");
}

#[tokio::test(start_paused = true)]
async fn a_pool_whose_pods_cannot_be_listed_is_not_published_and_still_stops() {
    let (fake, client) = FakeApi::start();
    // Pods cannot be listed (an API server that hangs on them, or missing RBAC): the pool's
    // reconciler waits for its adoption, and gateways are told nothing about it meanwhile.
    fake.stall(Some(PODS));
    fake.create_object(POOLS, pool("chat", json!({"minWarm": 1, "maxReplicas": 2})));
    let controller = start(client);
    wait_for("the pool's reconciler", SECS(10), || {
        pool_status(&controller, "chat")
    })
    .await;
    tokio::time::sleep(SECS(5)).await;
    assert!(
        !controller.endpoints().borrow().pools.contains_key("chat"),
        "an unadopted pool is not published"
    );
    assert!(!pool_status(&controller, "chat").unwrap().adopted);

    // Deleting it stops its reconciler although adoption never finished.
    fake.delete(POOLS, "chat");
    wait_for("the deleted pool stopped", SECS(10), || {
        pool_status(&controller, "chat").is_none().then_some(())
    })
    .await;
    fake.stall(None);
}

#[tokio::test(start_paused = true)]
async fn a_pod_that_stops_being_ready_leaves_the_endpoint_set_until_ready_again() {
    let (fake, client) = FakeApi::start();
    fake.create_object(POOLS, pool("chat", json!({"minWarm": 1, "maxReplicas": 2})));
    let controller = start(client);
    let created = fake
        .expect(0, SECS(10), "a warm pod", |r| creates_pod(r, "warm"))
        .await;
    let pod = created.body["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    make_ready(&fake, &pod, "10.0.0.7");
    wait_for("the endpoint", SECS(10), || {
        let s = pool_status(&controller, "chat")?;
        (s.endpoint_addresses() == ["10.0.0.7:8000"]).then_some(())
    })
    .await;

    // The readiness probe fails: out of the set, counted as starting, not deleted.
    make_scheduled(&fake, &pod);
    let s = wait_for("the endpoint gone", SECS(10), || {
        pool_status(&controller, "chat").filter(|s| s.endpoints.is_empty())
    })
    .await;
    assert_eq!((s.ready, s.starting), (0, 1));
    let mark = fake.mark();
    tokio::time::sleep(SECS(10)).await;
    assert!(
        !fake
            .requests()
            .iter()
            .skip(mark)
            .any(|r| r.method == "DELETE" || creates_pod(r, "warm")),
        "an unready pod is neither deleted nor replaced within its startup timeout"
    );

    make_ready(&fake, &pod, "10.0.0.7");
    let s = wait_for("the endpoint back", SECS(10), || {
        pool_status(&controller, "chat").filter(|s| !s.endpoints.is_empty())
    })
    .await;
    assert_eq!((s.ready, s.starting, s.failures), (1, 0, 0));

    // Unready for longer than the startup timeout (30 s): deleted and replaced.
    make_scheduled(&fake, &pod);
    let delete = fake
        .expect(mark, SECS(60), "the stuck pod deleted", |r| {
            deletes_pod(r, &pod)
        })
        .await;
    assert_eq!(delete.body["gracePeriodSeconds"], 20);
    fake.expect(mark, SECS(30), "a replacement", |r| creates_pod(r, "warm"))
        .await;
}

#[tokio::test(start_paused = true)]
async fn an_invalid_pool_is_reported_on_the_resource_and_a_deleted_pool_stops() {
    let (fake, client) = FakeApi::start();
    fake.create_object(POOLS, pool("bad", json!({"maxReplicas": 0})));
    fake.create_object(POOLS, pool("chat", json!({"minWarm": 0})));
    let controller = start(client);

    let apply = fake
        .expect(0, SECS(10), "an InvalidSpec condition", |r| {
            r.path == format!("{POOLS}/bad/status")
                && r.body["status"]["conditions"][0]["reason"] == "InvalidSpec"
        })
        .await;
    let message = apply.body["status"]["conditions"][0]["message"]
        .as_str()
        .unwrap();
    assert!(message.contains("spec.scaling.maxReplicas"), "{message}");
    let warning = fake
        .expect(0, SECS(10), "an InvalidSpec event", |r| {
            posts_event(r, "InvalidSpec")
        })
        .await;
    assert_eq!(warning.body["regarding"]["name"], "bad");
    assert!(pool_status(&controller, "bad").is_none());
    assert!(
        !fake
            .requests()
            .iter()
            .any(|r| creates_pod(r, "warm") || creates_pod(r, "ephemeral"))
    );

    wait_for("the valid pool running", SECS(10), || {
        pool_status(&controller, "chat")
    })
    .await;
    fake.delete(POOLS, "chat");
    wait_for("the deleted pool stopped", SECS(30), || {
        pool_status(&controller, "chat").is_none().then_some(())
    })
    .await;
}

fn lease_config(identity: &str) -> LeaderConfig {
    LeaderConfig {
        lease: "llmctl-controller".into(),
        identity: identity.into(),
        lease_duration: SECS(15),
        renew_deadline: SECS(10),
        retry_period: SECS(2),
    }
}

#[tokio::test(start_paused = true)]
async fn leadership_is_exclusive_released_on_shutdown_and_taken_over_when_the_leader_dies() {
    let (fake, client) = FakeApi::start();
    let elector = |id: &str| Elector::new(Api::namespaced(client.clone(), NS), lease_config(id));
    let holder =
        || fake.get(LEASES, "llmctl-controller").unwrap()["spec"]["holderIdentity"].clone();
    let transitions =
        || fake.get(LEASES, "llmctl-controller").unwrap()["spec"]["leaseTransitions"].clone();

    let mut a = elector("a");
    let mut b = elector("b");
    assert_eq!(
        a.try_acquire_or_renew().await.unwrap(),
        Attempt::Held,
        "a free lease is taken"
    );
    assert_eq!(
        b.try_acquire_or_renew().await.unwrap(),
        Attempt::HeldBy("a".into()),
        "a held lease is not"
    );
    let lead_a = a.keep();
    let b_waits = tokio::spawn(async move {
        b.acquire().await;
        b
    });
    tokio::time::sleep(SECS(60)).await;
    assert!(
        !b_waits.is_finished(),
        "b took a lease that a keeps renewing"
    );
    assert_eq!(holder(), "a");

    // A clean shutdown releases: b takes over within its retry period, not the lease duration.
    let released_at = Instant::now();
    lead_a.release().await;
    let b = tokio::time::timeout(SECS(5), b_waits)
        .await
        .expect("b takes over")
        .unwrap();
    assert!(released_at.elapsed() <= SECS(3));
    assert_eq!((holder(), transitions()), (json!("b"), json!(1)));

    // b dies without releasing: c waits out the lease duration, then takes over.
    drop(b);
    let mut c = elector("c");
    let waiting_since = Instant::now();
    c.acquire().await;
    assert!(
        waiting_since.elapsed() >= SECS(15),
        "{:?}",
        waiting_since.elapsed()
    );
    assert_eq!((holder(), transitions()), (json!("c"), json!(2)));

    // A leader that finds the lease taken from it notices and stops leading.
    let mut d = elector("d");
    let mut lead_c = c.keep();
    fake.update(LEASES, "llmctl-controller", |l| {
        l["spec"]["holderIdentity"] = json!("d");
    });
    let reason = tokio::time::timeout(SECS(5), lead_c.lost())
        .await
        .expect("c notices");
    assert!(reason.contains("replica d holds the lease"), "{reason}");
    assert_eq!(
        d.try_acquire_or_renew().await.unwrap(),
        Attempt::Held,
        "the new holder renews"
    );

    // A leader whose API calls hang stops leading by its renew deadline, before the lease
    // it last wrote runs out and another replica may take over.
    let mut lead_d = d.keep();
    tokio::time::sleep(SECS(7)).await;
    let stalled_at = Instant::now();
    fake.stall(Some("/"));
    let reason = tokio::time::timeout(SECS(30), lead_d.lost())
        .await
        .expect("d gives up while the API hangs");
    assert!(reason.contains("could not renew"), "{reason}");
    assert!(
        stalled_at.elapsed() <= SECS(10),
        "stopped leading {:?} after the last renewal could start",
        stalled_at.elapsed()
    );
    fake.stall(None);
}
