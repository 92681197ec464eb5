//! Per-request limits: a batch beyond the limit is refused with the field and the limit, before any work.

use std::sync::Arc;

use sigil_proto::admin::v1 as pb;
use sigil_proto::admin::v1::entries_server::Entries;
use sigil_server::admin::Admin;
use sigil_server::validate::MAX_BATCH;
use sigil_server::{RunArgs, ServerConfig, State};
use sigil_test_util::ManualClock;

fn entry(i: usize) -> pb::Entry {
    pb::Entry {
        spiffe_id: format!("spiffe://identity.example.com/w/{i}"),
        parent_id: "spiffe://identity.example.com/sigil/server".into(),
        selectors: vec![pb::Selector {
            r#type: "unix".into(),
            value: format!("uid:{i}"),
        }],
        ..Default::default()
    }
}

#[tokio::test]
async fn batch_create_entry_over_the_limit_is_invalid_argument() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = ServerConfig::from_args(&RunArgs {
        data_dir: Some(dir.path().join("data")),
        admin_socket: Some(dir.path().join("admin/api.sock")),
        ..Default::default()
    })?;
    let state = State::open(
        config,
        Arc::new(ManualClock::new(std::time::SystemTime::now())),
    )?;
    let admin = Admin::new(state.clone());

    let too_many: Vec<_> = (0..=MAX_BATCH).map(entry).collect();
    let err = admin
        .batch_create_entry(tonic::Request::new(pb::BatchCreateEntryRequest {
            entries: too_many,
        }))
        .await
        .expect_err("a batch over the limit must be refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().starts_with("entries:"), "{}", err.message());
    assert!(err.message().contains("10000"), "{}", err.message());
    assert_eq!(
        state.catalog.len(),
        0,
        "nothing of a refused batch is created"
    );

    // A batch within the limit still works.
    let ok = admin
        .batch_create_entry(tonic::Request::new(pb::BatchCreateEntryRequest {
            entries: (0..3).map(entry).collect(),
        }))
        .await?;
    assert_eq!(ok.into_inner().entries.len(), 3);
    Ok(())
}
