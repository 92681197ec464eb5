//! A Workload API client built on the `spiffe` crate, for tests that run it as another user or inside an
//! endpoint: `sigil-test-workload unix:///path/api.sock` fetches the X.509 context and prints one line
//! `svid <SPIFFE ID>` per X.509-SVID it was given (exit 0), or `error <message>` (exit 2).
#![forbid(unsafe_code)]

use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(endpoint) = std::env::args().nth(1) else {
        println!("error usage: sigil-test-workload unix:///path/to/api.sock");
        return ExitCode::from(2);
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            println!("error runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let fetched = rt.block_on(async {
        let client = spiffe::WorkloadApiClient::connect_to(&endpoint).await?;
        client.fetch_x509_context().await
    });
    match fetched {
        Ok(ctx) => {
            for svid in ctx.svids() {
                println!("svid {}", svid.spiffe_id());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("error {e}");
            ExitCode::from(2)
        }
    }
}
