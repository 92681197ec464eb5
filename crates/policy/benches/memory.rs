//! Memory per identity and per policy-map entry, counted by a global allocator that tracks
//! live heap bytes (not a criterion bench: it prints a table). Beside it, the linear
//! first-match list's memory for the same policies.
//!
//! `cargo bench -p sigil-policy --bench memory`
#![allow(unsafe_code)]

#[path = "support/linear.rs"]
mod linear;
#[path = "support/synthetic.rs"]
mod synthetic;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use linear::{Linear, cache_sets};
use sigil_identity::NumericIdentity;
use sigil_labels::{Label, Labels, Source};
use sigil_policy::{EnforcementMode, PolicyEngine, parse_documents};
use synthetic::World;

/// Live heap bytes.
static LIVE: AtomicUsize = AtomicUsize::new(0);

struct Counting;

// SAFETY: every method forwards to the system allocator with the caller's arguments, so the
// GlobalAlloc contract holds as it does for `System`; the counter has no effect on memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same layout as the caller's, which meets `alloc`'s requirements.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` (through this allocator) with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` and `layout` come from this allocator; `new_size` is the caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            LIVE.fetch_add(new_size, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

fn mib(b: usize) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Entries of every endpoint's map, as the datapath holds them (one BPF map per endpoint).
fn datapath_entries(e: &PolicyEngine) -> usize {
    e.endpoints().into_iter().map(|ep| e.map_len(ep)).sum()
}

/// Bytes per identity and per compiled policy, for a synthetic cluster.
fn cluster(labels: u32, cidrs: u32, rules: u32) {
    let world = World::new(labels, cidrs, rules);
    let n = world.identities.len();
    // The baseline's inputs are made before counting starts.
    let lin_ids = world.all_identities();

    // Counted from here: the identities' labels, then what the engine adds for them.
    let base = live();
    let ids = world.all_identities();
    let mut e = PolicyEngine::new(EnforcementMode::Default);
    e.add_identities(ids);
    let identities = live() - base;
    // The documents are counted too: the engine keeps them (trace and re-evaluation).
    let t = Instant::now();
    let before = live();
    let docs = world.docs.clone();
    e.upsert_policies(docs);
    let compiled = live() - before;
    let took = t.elapsed();
    let entries = datapath_entries(&e);
    println!(
        "{labels} label + {cidrs} CIDR identities, {rules} policies (compiled in {:.2} s):\n  \
         identities alone: {:.1} MiB = {} bytes per identity (labels included)\n  \
         policies compiled: {:.1} MiB for {} distinct maps; {entries} entries over {} endpoint \
         maps as the datapath holds them\n  \
         engine total: {:.1} MiB = {} bytes per identity",
        took.as_secs_f64(),
        mib(identities),
        identities / n,
        mib(compiled),
        e.distinct_maps(),
        e.endpoints().len(),
        mib(identities + compiled),
        (identities + compiled) / n,
    );
    let sets = cache_sets(&e);
    let start = live();
    let lin = Linear::build(&world.docs, &lin_ids, Some(&sets));
    let lin_bytes = live() - start;
    let members: usize = lin.sets.iter().map(|s| s.members.len()).sum();
    println!(
        "  baseline linear list: {:.1} MiB ({} rules, {} ipsets, {members} set members; the \
         labels are not counted)",
        mib(lin_bytes),
        lin.rules.len(),
        lin.sets.len(),
    );
    drop(sets);
    drop(lin);
    drop(e);
}

/// A subject endpoint allowing `peers` identities on `ports` ports, beside the same number of
/// identities no rule selects: the difference is what the map entries and the selector cache
/// hold. Returns (bytes, map entries added).
fn entries_for(peers: u32, ports: u32) -> (usize, usize) {
    let port_list: Vec<String> = (0..ports)
        .map(|k| format!("{{port: '{}', protocol: TCP}}", 10_000 + 3 * k))
        .collect();
    let yaml = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: m, namespace: prod}}\n\
         spec:\n  endpointSelector: {{matchLabels: {{app: target}}}}\n  ingress:\n  \
         - fromEndpoints: [{{matchLabels: {{team: peer}}}}]\n    toPorts: [{{ports: [{}]}}]\n",
        port_list.join(", ")
    );
    let docs = parse_documents(&yaml, "memory").unwrap_or_else(|e| panic!("{e}"));
    let pod = |app: &str, team: &str, j: u32| -> Labels {
        [
            Label::new(Source::K8s, "app", app),
            Label::new(Source::K8s, "team", team),
            Label::new(Source::K8s, "version", format!("v{j}")),
            Label::new(Source::K8s, "io.kubernetes.pod.namespace", "prod"),
        ]
        .into_iter()
        .collect()
    };
    let target = NumericIdentity::new(256);
    let run = |team: &str| -> (usize, usize) {
        let mut e = PolicyEngine::new(EnforcementMode::Default);
        e.add_identity(target, pod("target", "none", 0));
        e.upsert_policies(docs.clone());
        let batch: Vec<(NumericIdentity, Labels)> = (0..peers)
            .map(|j| (NumericIdentity::new(1000 + j), pod("client", team, j)))
            .collect();
        let before = live();
        let len = e.map_len(target);
        e.add_identities(batch);
        (live() - before, e.map_len(target) - len)
    };
    let (matched, entries) = run("peer");
    let (unmatched, none) = run("other");
    assert_eq!(none, 0, "identities no rule selects add no entries");
    (matched.saturating_sub(unmatched), entries)
}

fn main() {
    // `cargo bench` passes criterion-style flags; this binary takes none.
    println!("# memory (live heap bytes, counting allocator)\n");
    let peers = 10_000;
    let (b1, e1) = entries_for(peers, 1);
    let (b8, e8) = entries_for(peers, 8);
    let per_entry = (b8 - b1) as f64 / (e8 - e1) as f64;
    let per_match = b1 as f64 / f64::from(peers) - per_entry * (e1 as f64 / f64::from(peers));
    println!(
        "policy-map entries: {peers} peers x 1 port: {e1} entries, {b1} bytes; x 8 ports: {e8} \
         entries, {b8} bytes\n  => {per_entry:.1} bytes per map entry, {per_match:.1} bytes per \
         selector-cache match (the peer's membership, shared by all its entries)\n  \
         (a BPF policy map entry is 8 bytes of key + 8 of value, held by the kernel)\n"
    );
    cluster(10_000, 2_000, 1_000);
    cluster(80_000, 20_000, 1_000);
}
