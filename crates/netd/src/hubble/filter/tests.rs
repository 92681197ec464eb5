use super::*;

fn flow() -> fpb::Flow {
    fpb::Flow {
        uuid: "u-1".into(),
        verdict: fpb::Verdict::Dropped as i32,
        ip: Some(fpb::Ip {
            source: "10.1.0.2".into(),
            destination: "10.1.0.3".into(),
            ip_version: fpb::IpVersion::IPv4 as i32,
            encrypted: false,
        }),
        l4: Some(fpb::Layer4 {
            protocol: Some(fpb::layer4::Protocol::Tcp(fpb::Tcp {
                source_port: 40000,
                destination_port: 8080,
                flags: Some(fpb::TcpFlags {
                    syn: true,
                    ..Default::default()
                }),
            })),
        }),
        source: Some(fpb::Endpoint {
            id: 7,
            identity: 256,
            namespace: "default".into(),
            labels: vec![
                "k8s:app=frontend".into(),
                "k8s:io.kubernetes.pod.namespace=default".into(),
                "spiffe:spiffe.io/spiffe-id=spiffe://example.org/web".into(),
            ],
            pod_name: "web-1".into(),
            workloads: vec![],
        }),
        destination: Some(fpb::Endpoint {
            id: 8,
            identity: 257,
            namespace: "prod".into(),
            labels: vec!["k8s:app=backend".into()],
            pod_name: "db-0".into(),
            workloads: vec![],
        }),
        node_name: "node-a.example".into(),
        is_reply: Some(false),
        event_type: Some(fpb::CiliumEventType {
            r#type: 1,
            sub_type: 133,
        }),
        traffic_direction: fpb::TrafficDirection::Ingress as i32,
        ..Default::default()
    }
}

fn matches(white: fpb::FlowFilter) -> bool {
    Filters::new(&[white], &[]).expect("valid").matches(&flow())
}

#[test]
fn every_supported_field_matches_its_value_and_not_another() {
    type Case = (fn(&mut fpb::FlowFilter), fn(&mut fpb::FlowFilter));
    let cases: Vec<(&str, Case)> = vec![
        (
            "uuid",
            (
                |f| f.uuid = vec!["u-1".into()],
                |f| f.uuid = vec!["u-2".into()],
            ),
        ),
        (
            "source_ip",
            (
                |f| f.source_ip = vec!["10.1.0.0/16".into()],
                |f| f.source_ip = vec!["10.1.0.3".into()],
            ),
        ),
        (
            "destination_ip",
            (
                |f| f.destination_ip = vec!["10.1.0.3".into()],
                |f| f.destination_ip = vec!["10.2.0.0/16".into()],
            ),
        ),
        (
            "source_pod",
            (
                |f| f.source_pod = vec!["default/web".into()],
                |f| f.source_pod = vec!["prod/web".into()],
            ),
        ),
        (
            "destination_pod",
            (
                |f| f.destination_pod = vec!["db-".into()],
                |f| f.destination_pod = vec!["web".into()],
            ),
        ),
        (
            "source_label",
            (
                |f| f.source_label = vec!["app=frontend".into()],
                |f| f.source_label = vec!["app=backend".into()],
            ),
        ),
        (
            "source_label spiffe",
            (
                |f| {
                    f.source_label =
                        vec!["spiffe:spiffe.io/spiffe-id=spiffe://example.org/web".into()]
                },
                |f| f.source_label = vec!["spiffe.io/spiffe-id=spiffe://example.org/db".into()],
            ),
        ),
        (
            "source_label in",
            (
                |f| f.source_label = vec!["k8s:app in (x, frontend),!debug".into()],
                |f| f.source_label = vec!["app notin (frontend)".into()],
            ),
        ),
        (
            "destination_label",
            (
                |f| f.destination_label = vec!["app".into()],
                |f| f.destination_label = vec!["!app".into()],
            ),
        ),
        (
            "source_identity",
            (
                |f| f.source_identity = vec![1, 256],
                |f| f.source_identity = vec![257],
            ),
        ),
        (
            "destination_identity",
            (
                |f| f.destination_identity = vec![257],
                |f| f.destination_identity = vec![256],
            ),
        ),
        (
            "traffic_direction",
            (
                |f| f.traffic_direction = vec![1],
                |f| f.traffic_direction = vec![2],
            ),
        ),
        (
            "verdict",
            (|f| f.verdict = vec![2], |f| f.verdict = vec![1]),
        ),
        (
            "event_type",
            (
                |f| {
                    f.event_type = vec![fpb::EventTypeFilter {
                        r#type: 1,
                        match_sub_type: true,
                        sub_type: 133,
                    }]
                },
                |f| {
                    f.event_type = vec![fpb::EventTypeFilter {
                        r#type: 5,
                        ..Default::default()
                    }]
                },
            ),
        ),
        (
            "event_type sub",
            (
                |f| {
                    f.event_type = vec![fpb::EventTypeFilter {
                        r#type: 1,
                        ..Default::default()
                    }]
                },
                |f| {
                    f.event_type = vec![fpb::EventTypeFilter {
                        r#type: 1,
                        match_sub_type: true,
                        sub_type: 181,
                    }]
                },
            ),
        ),
        (
            "protocol",
            (
                |f| f.protocol = vec!["TCP".into()],
                |f| f.protocol = vec!["udp".into(), "icmp".into()],
            ),
        ),
        (
            "source_port",
            (
                |f| f.source_port = vec!["40000".into()],
                |f| f.source_port = vec!["8080".into()],
            ),
        ),
        (
            "destination_port",
            (
                |f| f.destination_port = vec!["8080".into()],
                |f| f.destination_port = vec!["80".into()],
            ),
        ),
        (
            "reply",
            (|f| f.reply = vec![false], |f| f.reply = vec![true]),
        ),
        (
            "tcp_flags",
            (
                |f| {
                    f.tcp_flags = vec![fpb::TcpFlags {
                        syn: true,
                        ..Default::default()
                    }]
                },
                |f| {
                    f.tcp_flags = vec![fpb::TcpFlags {
                        syn: true,
                        ack: true,
                        ..Default::default()
                    }]
                },
            ),
        ),
        (
            "node_name",
            (
                |f| f.node_name = vec!["node-*.example".into()],
                |f| f.node_name = vec!["node*".into()],
            ),
        ),
        (
            "ip_version",
            (|f| f.ip_version = vec![1], |f| f.ip_version = vec![2]),
        ),
    ];
    for (name, (yes, no)) in cases {
        let mut f = fpb::FlowFilter::default();
        yes(&mut f);
        assert!(matches(f), "{name}: should match");
        let mut f = fpb::FlowFilter::default();
        no(&mut f);
        assert!(!matches(f), "{name}: should not match");
    }
}

#[test]
fn whitelist_is_any_of_blacklist_removes_and_fields_combine_with_and() {
    let web = fpb::FlowFilter {
        source_pod: vec!["web".into()],
        ..Default::default()
    };
    let udp = fpb::FlowFilter {
        protocol: vec!["udp".into()],
        ..Default::default()
    };
    let f = flow();
    assert!(
        Filters::new(&[udp.clone(), web.clone()], &[])
            .unwrap()
            .matches(&f)
    );
    assert!(
        !Filters::new(std::slice::from_ref(&udp), &[])
            .unwrap()
            .matches(&f)
    );
    assert!(
        !Filters::new(std::slice::from_ref(&web), std::slice::from_ref(&web))
            .unwrap()
            .matches(&f)
    );
    assert!(
        !Filters::new(&[], &[udp.clone(), web.clone()])
            .unwrap()
            .matches(&f)
    );
    assert!(
        Filters::new(&[], std::slice::from_ref(&udp))
            .unwrap()
            .matches(&f)
    );
    assert!(Filters::new(&[], &[]).unwrap().matches(&f));
    // Two fields in one filter: both must hold.
    let both = fpb::FlowFilter {
        source_pod: vec!["web".into()],
        protocol: vec!["udp".into()],
        ..Default::default()
    };
    assert!(!Filters::new(&[both], &[]).unwrap().matches(&f));
    // A flow without ports or an endpoint without a pod never matches port or pod filters.
    let mut bare = flow();
    bare.l4 = None;
    bare.source = Some(fpb::Endpoint::default());
    let port = fpb::FlowFilter {
        destination_port: vec!["8080".into()],
        ..Default::default()
    };
    assert!(!Filters::new(&[port], &[]).unwrap().matches(&bare));
    assert!(!Filters::new(&[web], &[]).unwrap().matches(&bare));
}

#[test]
fn bad_filters_are_refused_with_the_field_path_and_value() {
    let cases: Vec<(fpb::FlowFilter, &str, &str)> = vec![
        (
            fpb::FlowFilter {
                source_ip: vec!["10.0.0.1".into(), "10.0.0.300".into()],
                ..Default::default()
            },
            "whitelist[0].source_ip[1]",
            "10.0.0.300",
        ),
        (
            fpb::FlowFilter {
                destination_ip: vec!["10.0.0.0/33".into()],
                ..Default::default()
            },
            "whitelist[0].destination_ip[0]",
            "10.0.0.0/33",
        ),
        (
            fpb::FlowFilter {
                destination_port: vec!["70000".into()],
                ..Default::default()
            },
            "whitelist[0].destination_port[0]",
            "70000",
        ),
        (
            fpb::FlowFilter {
                protocol: vec!["http".into()],
                ..Default::default()
            },
            "whitelist[0].protocol[0]",
            "http",
        ),
        (
            fpb::FlowFilter {
                source_label: vec!["app in x".into()],
                ..Default::default()
            },
            "whitelist[0].source_label[0]",
            "app in x",
        ),
        (
            fpb::FlowFilter {
                source_label: vec!["a=b,,c".into()],
                ..Default::default()
            },
            "whitelist[0].source_label[0]",
            "a=b,,c",
        ),
        (
            fpb::FlowFilter {
                source_pod: vec!["/web".into()],
                ..Default::default()
            },
            "whitelist[0].source_pod[0]",
            "/web",
        ),
        (
            fpb::FlowFilter {
                verdict: vec![99],
                ..Default::default()
            },
            "whitelist[0].verdict[0]",
            "99",
        ),
        (
            fpb::FlowFilter {
                event_type: vec![fpb::EventTypeFilter {
                    r#type: -1,
                    ..Default::default()
                }],
                ..Default::default()
            },
            "whitelist[0].event_type[0].type",
            "-1",
        ),
        (
            fpb::FlowFilter {
                source_fqdn: vec!["x.example".into()],
                ..Default::default()
            },
            "whitelist[0].source_fqdn",
            "not supported",
        ),
        (
            fpb::FlowFilter {
                http_path: vec!["/".into()],
                ..Default::default()
            },
            "whitelist[0].http_path",
            "not supported",
        ),
    ];
    for (f, field, value) in cases {
        let e = Filters::new(&[f], &[]).expect_err(field);
        let text = e.to_string();
        assert!(text.starts_with(field), "{text}");
        assert!(text.contains(value), "{text}");
    }
    let e = Filters::new(
        &[],
        &[fpb::FlowFilter {
            node_name: vec![String::new()],
            ..Default::default()
        }],
    )
    .expect_err("blacklist");
    assert!(
        e.to_string().starts_with("blacklist[0].node_name[0]"),
        "{e}"
    );
}

#[test]
fn cidrs_and_globs_match_exactly_their_range() {
    let c = Cidr::parse("10.1.0.0/16").unwrap();
    assert!(c.contains("10.1.255.255".parse().unwrap()));
    assert!(!c.contains("10.2.0.0".parse().unwrap()));
    assert!(!c.contains("::ffff:10.1.0.1".parse().unwrap()));
    assert!(
        Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("1.2.3.4".parse().unwrap())
    );
    let v6 = Cidr::parse("fd00:101::/64").unwrap();
    assert!(v6.contains("fd00:101::5".parse().unwrap()));
    assert!(!v6.contains("fd00:102::5".parse().unwrap()));
    assert!(
        Cidr::parse("::/0")
            .unwrap()
            .contains("::1".parse().unwrap())
    );
    assert!(glob("k8s*", "k8s-node1"));
    assert!(!glob("k8s*", "k8s.node1"));
    assert!(glob("*.example", "node-a.example"));
    assert!(glob("*", "a"));
    assert!(!glob("a", "ab"));
}
