use futures::StreamExt;
use opb::observer_server::Observer as _;

use super::*;

fn flow(port: u32) -> Item {
    Item::Flow(fpb::Flow {
        l4: Some(fpb::Layer4 {
            protocol: Some(fpb::layer4::Protocol::Udp(fpb::Udp {
                source_port: 1,
                destination_port: port,
            })),
        }),
        ..Default::default()
    })
}

fn port_of(r: &opb::GetFlowsResponse) -> Option<u32> {
    match r.response_types.as_ref()? {
        opb::get_flows_response::ResponseTypes::Flow(f) => {
            match f.l4.as_ref()?.protocol.as_ref()? {
                fpb::layer4::Protocol::Udp(u) => Some(u.destination_port),
                _ => None,
            }
        }
        _ => None,
    }
}

fn lost_of(r: &opb::GetFlowsResponse) -> Option<(i32, u64)> {
    match r.response_types.as_ref()? {
        opb::get_flows_response::ResponseTypes::LostEvents(l) => {
            Some((l.source, l.num_events_lost))
        }
        _ => None,
    }
}

/// A ring with flows to ports 1..=10 at times 100..=1000 ns and a lost notice after the 5th.
fn setup(max_follows: usize) -> (Arc<FlowRing>, Observer, watch::Sender<bool>) {
    let ring = Arc::new(FlowRing::new(100));
    for p in 1..=10u32 {
        ring.push(i64::from(p) * 100, flow(p));
        if p == 5 {
            ring.push(
                550,
                Item::Lost(fpb::LostEvent {
                    source: fpb::LostEventSource::PerfEventRingBuffer as i32,
                    num_events_lost: 3,
                    cpu: None,
                }),
            );
        }
    }
    let (stop_tx, stop) = watch::channel(false);
    let obs = Observer::new(Arc::clone(&ring), "n1", "unix:///x", max_follows, stop);
    (ring, obs, stop_tx)
}

async fn collect(
    obs: &Observer,
    req: opb::GetFlowsRequest,
) -> Result<Vec<opb::GetFlowsResponse>, Status> {
    let s = obs.get_flows(Request::new(req)).await?.into_inner();
    Ok(s.map(|r| r.expect("item")).collect().await)
}

fn ports(v: &[opb::GetFlowsResponse]) -> Vec<u32> {
    v.iter().filter_map(port_of).collect()
}

fn odd_ports() -> Vec<fpb::FlowFilter> {
    vec![fpb::FlowFilter {
        destination_port: vec!["1".into(), "3".into(), "5".into(), "7".into(), "9".into()],
        ..Default::default()
    }]
}

#[tokio::test]
async fn number_first_since_until_and_filters_follow_hubbles_semantics() {
    let (_ring, obs, _stop) = setup(4);
    // The last 3 matching flows, oldest first.
    let r = collect(
        &obs,
        opb::GetFlowsRequest {
            number: 3,
            whitelist: odd_ports(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(ports(&r), vec![5, 7, 9]);
    // The lost-event notice in range comes through although no filter matches it.
    assert_eq!(
        r.iter().filter_map(lost_of).collect::<Vec<_>>(),
        vec![(1, 3)]
    );
    // The first 2.
    let r = collect(
        &obs,
        opb::GetFlowsRequest {
            number: 2,
            first: true,
            whitelist: odd_ports(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(ports(&r), vec![1, 3]);
    // A time window, with a blacklist.
    let r = collect(
        &obs,
        opb::GetFlowsRequest {
            since: Some(timestamp(300)),
            until: Some(timestamp(700)),
            blacklist: odd_ports(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(ports(&r), vec![4, 6]);
    // number 0 without follow: everything.
    let r = collect(&obs, opb::GetFlowsRequest::default())
        .await
        .unwrap();
    assert_eq!(ports(&r).len(), 10);
    // Each response says the node and carries the time.
    assert!(r.iter().all(|x| x.node_name == "n1" && x.time.is_some()));
}

#[tokio::test]
async fn bad_requests_are_invalid_arguments_naming_the_field() {
    let (_ring, obs, _stop) = setup(4);
    let bad = [
        (
            opb::GetFlowsRequest {
                first: true,
                follow: true,
                ..Default::default()
            },
            "first",
        ),
        (
            opb::GetFlowsRequest {
                since: Some(timestamp(500)),
                until: Some(timestamp(400)),
                ..Default::default()
            },
            "until",
        ),
        (
            opb::GetFlowsRequest {
                since: Some(prost_types::Timestamp {
                    seconds: 1,
                    nanos: 2_000_000_000,
                }),
                ..Default::default()
            },
            "since",
        ),
        (
            opb::GetFlowsRequest {
                whitelist: vec![fpb::FlowFilter {
                    source_ip: vec!["nope".into()],
                    ..Default::default()
                }],
                ..Default::default()
            },
            "whitelist[0].source_ip[0]",
        ),
    ];
    for (req, field) in bad {
        let e = obs.get_flows(Request::new(req)).await.err().expect(field);
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{field}");
        assert!(e.message().starts_with(field), "{}", e.message());
    }
}

#[tokio::test]
async fn follow_streams_new_flows_reports_what_a_slow_follower_missed_and_ends_on_stop() {
    let (ring, obs, stop) = setup(4);
    let mut s = obs
        .get_flows(Request::new(opb::GetFlowsRequest {
            number: 1,
            follow: true,
            whitelist: odd_ports(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(port_of(&s.next().await.unwrap().unwrap()), Some(9));
    ring.push(1100, flow(2));
    ring.push(1200, flow(3));
    assert_eq!(port_of(&s.next().await.unwrap().unwrap()), Some(3));
    // 150 pushes into a ring of 100 before the follower reads: it is told how many it missed.
    for i in 0..150 {
        ring.push(2000 + i, flow(5));
    }
    let first = s.next().await.unwrap().unwrap();
    assert_eq!(
        lost_of(&first),
        Some((fpb::LostEventSource::HubbleRingBuffer as i32, 50))
    );
    stop.send_replace(true);
    // What was queued drains, then the stream ends.
    let rest: Vec<_> = s.collect().await;
    assert_eq!(rest.len(), 100);
}

#[tokio::test]
async fn follow_streams_past_the_limit_are_refused_and_a_closed_one_frees_its_place() {
    let (_ring, obs, _stop) = setup(2);
    let follow = || opb::GetFlowsRequest {
        follow: true,
        ..Default::default()
    };
    let a = obs.get_flows(Request::new(follow())).await.unwrap();
    let _b = obs.get_flows(Request::new(follow())).await.unwrap();
    let e = obs
        .get_flows(Request::new(follow()))
        .await
        .err()
        .expect("third");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(e.message().contains("2 follow streams"), "{}", e.message());
    // Non-follow requests are not limited.
    assert_eq!(
        collect(
            &obs,
            opb::GetFlowsRequest {
                number: 1,
                ..Default::default()
            }
        )
        .await
        .unwrap()
        .len(),
        1
    );
    drop(a);
    obs.get_flows(Request::new(follow()))
        .await
        .expect("a place was freed");
}

#[tokio::test]
async fn status_and_nodes_report_the_ring() {
    let (_ring, obs, _stop) = setup(2);
    let s = obs
        .server_status(Request::new(opb::ServerStatusRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((s.num_flows, s.max_flows, s.seen_flows), (10, 100, 10));
    assert!(s.uptime_ns > 0);
    let n = obs
        .get_nodes(Request::new(opb::GetNodesRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(n.nodes.len(), 1);
    assert_eq!(
        (n.nodes[0].name.as_str(), n.nodes[0].state),
        ("n1", relay::NodeState::NodeConnected as i32)
    );
}
