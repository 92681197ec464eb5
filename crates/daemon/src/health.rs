//! The standard gRPC health service (`grpc.health.v1.Health`) over a daemon's [`Readiness`]:
//! `SERVING` while the daemon serves, `NOT_SERVING` before and while it drains, for the server as
//! a whole (empty service name) and for each service it names; other names are unknown
//! (`NOT_FOUND` from `Check`, `SERVICE_UNKNOWN` from `Watch`), as the protocol says.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;

use sigil_proto::grpc::health::v1 as pb;
use sigil_proto::grpc::health::v1::health_check_response::ServingStatus;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::runtime::Readiness;

/// `grpc.health.v1.Health` for one daemon. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Health {
    ready: Readiness,
    services: Arc<BTreeSet<String>>,
}

impl Health {
    /// The health of a daemon whose readiness is `ready` and which serves `services` (full gRPC
    /// service names, e.g. `sigil.netd.v1.Endpoints`).
    pub fn new(ready: Readiness, services: &[&str]) -> Self {
        Self {
            ready,
            services: Arc::new(services.iter().map(|s| (*s).to_owned()).collect()),
        }
    }

    /// The tonic service to add to a router.
    pub fn into_server(self) -> pb::health_server::HealthServer<Self> {
        pb::health_server::HealthServer::new(self)
    }

    fn known(&self, service: &str) -> bool {
        service.is_empty() || self.services.contains(service)
    }

    fn status(ready: bool) -> ServingStatus {
        if ready {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        }
    }
}

fn reply(status: ServingStatus) -> pb::HealthCheckResponse {
    pb::HealthCheckResponse {
        status: status.into(),
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::health_server::Health for Health {
    async fn check(
        &self,
        req: Request<pb::HealthCheckRequest>,
    ) -> Result<Response<pb::HealthCheckResponse>, Status> {
        let service = req.into_inner().service;
        if !self.known(&service) {
            return Err(Status::not_found(format!(
                "service: unknown service {service:?}"
            )));
        }
        Ok(Response::new(reply(Self::status(self.ready.is_ready()))))
    }

    async fn list(
        &self,
        _: Request<pb::HealthListRequest>,
    ) -> Result<Response<pb::HealthListResponse>, Status> {
        let status = Self::status(self.ready.is_ready());
        let statuses = std::iter::once(String::new())
            .chain(self.services.iter().cloned())
            .map(|s| (s, reply(status)))
            .collect();
        Ok(Response::new(pb::HealthListResponse { statuses }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<pb::HealthCheckRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let service = req.into_inner().service;
        if !self.known(&service) {
            let once = futures_util_once(reply(ServingStatus::ServiceUnknown));
            return Ok(Response::new(once));
        }
        let mut rx = self.ready.subscribe();
        let stream = async_stream(move |tx| async move {
            let mut last = None;
            loop {
                let now = Self::status(*rx.borrow_and_update());
                if last != Some(now) {
                    last = Some(now);
                    if tx.send(Ok(reply(now))).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { return },
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(stream))
    }
}

/// A stream of one item that then stays open (a `Watch` of an unknown service waits for it to
/// appear, which for a daemon never happens; the client decides when to stop).
fn futures_util_once(item: pb::HealthCheckResponse) -> WatchStream {
    async_stream(move |tx| async move {
        if tx.send(Ok(item)).await.is_ok() {
            tx.closed().await;
        }
    })
}

/// A stream fed by a task through a channel of one.
fn async_stream<F, Fut>(f: F) -> WatchStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::HealthCheckResponse, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use pb::health_server::Health as _;
    use tokio_stream::StreamExt;

    fn req(s: &str) -> Request<pb::HealthCheckRequest> {
        Request::new(pb::HealthCheckRequest { service: s.into() })
    }

    #[tokio::test]
    async fn check_follows_readiness_and_refuses_unknown_services() {
        let ready = Readiness::new();
        let h = Health::new(ready.clone(), &["sigil.netd.v1.Endpoints"]);
        let status = |r: pb::HealthCheckResponse| r.status;
        assert_eq!(
            status(h.check(req("")).await.unwrap().into_inner()),
            ServingStatus::NotServing as i32
        );
        ready.set_ready();
        for s in ["", "sigil.netd.v1.Endpoints"] {
            assert_eq!(
                status(h.check(req(s)).await.unwrap().into_inner()),
                ServingStatus::Serving as i32
            );
        }
        let e = h.check(req("nope.Service")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        assert!(e.message().contains("nope.Service"), "{e}");
        let list = h
            .list(Request::new(pb::HealthListRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(list.statuses.len(), 2);
    }

    #[tokio::test]
    async fn watch_sends_each_change() {
        let ready = Readiness::new();
        let h = Health::new(ready.clone(), &[]);
        let mut s = h.watch(req("")).await.unwrap().into_inner();
        assert_eq!(
            s.next().await.unwrap().unwrap().status,
            ServingStatus::NotServing as i32
        );
        ready.set_ready();
        assert_eq!(
            s.next().await.unwrap().unwrap().status,
            ServingStatus::Serving as i32
        );
        ready.set_not_ready();
        assert_eq!(
            s.next().await.unwrap().unwrap().status,
            ServingStatus::NotServing as i32
        );
        let mut u = h.watch(req("x")).await.unwrap().into_inner();
        assert_eq!(
            u.next().await.unwrap().unwrap().status,
            ServingStatus::ServiceUnknown as i32
        );
    }
}
