/* sigil datapath: identity-based policy at TC on an endpoint's host-side veth.
 *
 * sigil_from_ep runs at the host veth's ingress hook (packets leaving the endpoint: its egress
 * direction); sigil_to_ep runs at the host veth's egress hook (packets entering the endpoint: its
 * ingress direction). One program serves every endpoint: the endpoint id is the host veth's
 * ifindex, read from the skb. With a tunnel, sigil_from_tunnel (the VXLAN device's ingress)
 * enforces a local endpoint's ingress policy itself for packets from other nodes, with the VNI's
 * identity, and redirects them straight into the endpoint's namespace; only what it leaves to
 * the stack (no hop left, neighbour discovery) reaches sigil_to_ep, the identity in the mark. */
#include "sigil.h"

char _license[] SEC("license") = "Dual MIT/GPL";

#define CT_LIFETIME_TCP_NS (21600ULL * 1000000000ULL)
#define CT_LIFETIME_OTHER_NS (60ULL * 1000000000ULL)
#define CT_LIFETIME_CLOSING_NS (10ULL * 1000000000ULL)

#define TCP_FIN 0x01
#define TCP_RST 0x04
#define TCP_SYN 0x02
#define TCP_ACK 0x10

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_value);
	__uint(max_entries, 524288);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sigil_ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct policy_key);
	__type(value, struct policy_value);
	__uint(max_entries, 1048576);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sigil_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct endpoint_config);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sigil_endpoints SEC(".maps");

/* Local endpoints' own addresses → endpoint id, written with each endpoint's config. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct ep_addr_key);
	__type(value, __u32);
	__uint(max_entries, 131072);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sigil_ep_addrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct auth_key);
	__type(value, struct auth_value);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sigil_auth SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
	__uint(max_entries, 131072);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sigil_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sigil_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__type(key, struct counter_key);
	__type(value, struct counter_value);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sigil_counters SEC(".maps");

/* Events that did not fit in the ring buffer (the reader fell behind). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sigil_ev_lost SEC(".maps");

/* Fragments of one datagram arrive within the reassembly timeout (IPv6: 60 s, IPv4: 30 s). */
#define FRAG_LIFETIME_NS (60ULL * 1000000000ULL)

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct frag_key);
	__type(value, struct frag_value);
	__uint(max_entries, 16384);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sigil_frag SEC(".maps");

/* This node's tunnel device and underlay address (one entry, key 0). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct tunnel_config);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sigil_tunnel SEC(".maps");

static long (*bpf_skb_load_bytes)(const void *skb, __u32 offset, void *to, __u32 len) = (void *)26;
static long (*bpf_skb_get_tunnel_key)(void *skb, void *key, __u32 size, __u64 flags) = (void *)20;
static long (*bpf_skb_set_tunnel_key)(void *skb, void *key, __u32 size, __u64 flags) = (void *)21;
static long (*bpf_redirect)(__u32 ifindex, __u64 flags) = (void *)23;
static long (*bpf_skb_change_type)(void *skb, __u32 type) = (void *)32;
static long (*bpf_skb_store_bytes)(void *skb, __u32 offset, const void *from, __u32 len,
				   __u64 flags) = (void *)9;
static long (*bpf_l3_csum_replace)(void *skb, __u32 offset, __u64 from, __u64 to,
				   __u64 size) = (void *)10;
static long (*bpf_redirect_peer)(__u32 ifindex, __u64 flags) = (void *)155;

#define PACKET_HOST 0
#define TUNNEL_TTL 64

/* The kernel's struct bpf_tunnel_key (UAPI), with the IPv4 members of its unions named: the
 * underlay is IPv4, so the programs pass no BPF_F_TUNINFO_IPV6. Addresses in host byte order.
 * Kept out of sigil.h: it is kernel ABI, not sigil's. */
struct bpf_tunnel_key {
	__u32 tunnel_id;
	__u32 remote_ipv4;
	__u32 remote_ipv6_rest[3];
	__u8 tunnel_tos;
	__u8 tunnel_ttl;
	__u16 tunnel_ext;
	__u32 tunnel_label;
	__u32 local_ipv4;
	__u32 local_ipv6_rest[3];
};

/* Extension headers followed before giving up (RFC 8200's recommended order has at most six:
 * hop-by-hop, destination options, routing, fragment, authentication, destination options). */
#define IPV6_MAX_EXT 8

#define FRAG_NONE 0
#define FRAG_FIRST 1 /* offset 0, more fragments follow: carries the ports */
#define FRAG_LATER 2 /* offset > 0: no upper-layer header */

struct flow {
	__u8 family;
	__u8 protocol;
	__u8 tcp_flags;
	__u8 frag;
	__be16 sport;
	__be16 dport;
	__u8 saddr[16];
	__u8 daddr[16];
	__u32 frag_id;
	__u8 frag_nexthdr;
	__u8 hop_limit;
	__u8 pad[2];
	__u32 bad_reason; /* PARSE_BAD: why */
};

enum parse_result {
	PARSE_IP,   /* policy applies */
	PARSE_PASS, /* not IP: passes untouched */
	PARSE_ND,   /* ICMPv6 neighbour-discovery type with hop limit 255: passes after the source
		     * check if link-scoped (nd_on_link), else it is policy-checked like PARSE_IP */
	PARSE_BAD,  /* IP that cannot be classified: dropped after the source check */
};

/* Reads the ports (and TCP flags) of protocols that have them; 0 if the header is missing. */
static __always_inline int load_ports(struct __sk_buff *skb, struct flow *f, __u32 l4off)
{
	__be16 ports[2];

	if (f->protocol != IPPROTO_TCP && f->protocol != IPPROTO_UDP && f->protocol != IPPROTO_SCTP)
		return 0;
	if (bpf_skb_load_bytes(skb, l4off, ports, sizeof(ports)) < 0)
		return -1;
	f->sport = ports[0];
	f->dport = ports[1];
	if (f->protocol == IPPROTO_TCP) {
		__u8 flags = 0;

		if (bpf_skb_load_bytes(skb, l4off + 13, &flags, 1) == 0)
			f->tcp_flags = flags;
	}
	return 0;
}

static __always_inline enum parse_result bad(struct flow *f, __u32 reason)
{
	f->bad_reason = reason;
	return PARSE_BAD;
}

static __always_inline int is_ext_header(__u8 nh)
{
	return nh == NEXTHDR_HOP || nh == NEXTHDR_ROUTING || nh == NEXTHDR_FRAGMENT ||
	       nh == NEXTHDR_AUTH || nh == NEXTHDR_DEST;
}

static __always_inline enum parse_result parse_ipv4(struct __sk_buff *skb, struct flow *f,
						     const __u32 l3)
{
	__u8 ip[20];
	__u32 ihl;
	__u16 frag_off;

	if (bpf_skb_load_bytes(skb, l3, ip, sizeof(ip)) < 0)
		return PARSE_PASS;
	f->family = 4;
	f->protocol = ip[9];
	f->hop_limit = ip[8];
	__builtin_memcpy(f->saddr, &ip[12], 4);
	__builtin_memcpy(f->daddr, &ip[16], 4);
	ihl = (ip[0] & 0x0f) * 4;
	frag_off = ((__u16)(ip[6] & 0x1f) << 8) | ip[7];
	if (frag_off != 0 || (ip[6] & 0x20)) {
		f->frag = frag_off ? FRAG_LATER : FRAG_FIRST;
		f->frag_nexthdr = ip[9];
		f->frag_id = (__u32)ip[4] | ((__u32)ip[5] << 8);
	}
	/* Later fragments carry no ports: their flow comes from the first one (sigil_frag). */
	if (frag_off != 0)
		return PARSE_IP;
	if (ihl < 20)
		return bad(f, DROP_INVALID);
	if (load_ports(skb, f, l3 + ihl) < 0)
		return bad(f, DROP_INVALID);
	return PARSE_IP;
}

/* Walks up to IPV6_MAX_EXT extension headers to the upper-layer protocol and its ports. */
static __always_inline enum parse_result parse_ipv6(struct __sk_buff *skb, struct flow *f,
						     const __u32 l3)
{
	__u8 ip6[40];
	__u32 off = l3 + 40;
	__u8 nh, seen_frag = 0;
	int i;

	if (bpf_skb_load_bytes(skb, l3, ip6, sizeof(ip6)) < 0)
		return PARSE_PASS;
	f->family = 6;
	f->hop_limit = ip6[7];
	__builtin_memcpy(f->saddr, &ip6[8], 16);
	__builtin_memcpy(f->daddr, &ip6[24], 16);
	nh = ip6[6];
#pragma unroll
	for (i = 0; i < IPV6_MAX_EXT; i++) {
		__u8 h[8];

		if (!is_ext_header(nh))
			break;
		/* Every extension header is at least 8 bytes long. */
		if (bpf_skb_load_bytes(skb, off, h, sizeof(h)) < 0)
			return bad(f, DROP_INVALID_EXTHDR);
		if (nh == NEXTHDR_FRAGMENT) {
			__u16 frag_off = (((__u16)h[2] << 8) | h[3]) & 0xfff8;

			/* A second fragment header (even after an atomic fragment) is not something
			 * endpoints send. */
			if (seen_frag)
				return bad(f, DROP_INVALID_EXTHDR);
			seen_frag = 1;
			f->frag_nexthdr = h[0];
			__builtin_memcpy(&f->frag_id, &h[4], 4);
			if (frag_off != 0) {
				f->frag = FRAG_LATER;
				f->protocol = h[0];
				return PARSE_IP;
			}
			/* Offset 0 without more fragments is an atomic fragment: a whole packet. */
			f->frag = (h[3] & 1) ? FRAG_FIRST : FRAG_NONE;
			off += 8;
		} else if (nh == NEXTHDR_AUTH) {
			off += ((__u32)h[1] + 2) * 4;
		} else {
			off += ((__u32)h[1] + 1) * 8;
		}
		nh = h[0];
	}
	/* Still an extension header after the bound: the receiver would find an upper-layer
	 * protocol we did not see, so the packet cannot be checked. */
	if (is_ext_header(nh))
		return bad(f, DROP_INVALID_EXTHDR);
	f->protocol = nh;
	if (nh == IPPROTO_ICMPV6) {
		__u8 type = 0;

		/* Neighbour discovery (router/neighbour solicitation and advertisement, redirect)
		 * is link plumbing, not endpoint traffic. Real ND has hop limit 255 (RFC 4861); a
		 * forwarded packet cannot, so ND types from another endpoint are policy-checked.
		 * The sender picks the hop limit, so handle() also looks at the destination
		 * (nd_on_link) before letting one pass. ICMPv6 has no ports to load. */
		if (bpf_skb_load_bytes(skb, off, &type, 1) < 0)
			return bad(f, DROP_INVALID);
		if (type >= 133 && type <= 137 && f->hop_limit == 255)
			return PARSE_ND;
	}
	if (load_ports(skb, f, off) < 0)
		return bad(f, off > l3 + 40 ? DROP_INVALID_EXTHDR : DROP_INVALID);
	return PARSE_IP;
}

/* The Ethernet frame whose IP header is at `l3` (14 for the skb's own frame). */
static __always_inline enum parse_result parse_at(struct __sk_buff *skb, struct flow *f,
						  const __u32 l3)
{
	__be16 eth_proto;

	if (bpf_skb_load_bytes(skb, l3 - 2, &eth_proto, sizeof(eth_proto)) < 0)
		return PARSE_PASS;
	if (eth_proto == bswap16(ETH_P_IP))
		return parse_ipv4(skb, f, l3);
	if (eth_proto == bswap16(ETH_P_IPV6))
		return parse_ipv6(skb, f, l3);
	/* ARP and other non-IP traffic is not subject to identity policy. */
	return PARSE_PASS;
}

static __always_inline enum parse_result parse(struct __sk_buff *skb, struct flow *f)
{
	return parse_at(skb, f, 14);
}

static __always_inline int addr_eq(const __u8 *a, const __u8 *b, int len)
{
	__u8 diff = 0;
	int i;

#pragma unroll
	for (i = 0; i < 16; i++) {
		if (i < len)
			diff |= a[i] ^ b[i];
	}
	return diff == 0;
}

static __always_inline int addr_zero(const __u8 *a)
{
	__u8 any = 0;
	int i;

#pragma unroll
	for (i = 0; i < 16; i++)
		any |= a[i];
	return any == 0;
}

/* Whether a packet leaving the endpoint carries one of its own addresses as source. IPv6
 * link-local (fe80::/10) and unspecified (::) sources are accepted only towards link-local
 * unicast or interface/link-scoped multicast destinations (neighbour discovery, MLD): those
 * never leave the link. */
static __always_inline int source_ok(const struct endpoint_config *cfg, const struct flow *f)
{
	if (!cfg)
		return 0;
	if (f->family == 4)
		return (cfg->flags & EP_HAS_IPV4) && addr_eq(f->saddr, cfg->ipv4, 4);
	if ((cfg->flags & EP_HAS_IPV6) && addr_eq(f->saddr, cfg->ipv6, 16))
		return 1;
	if ((f->saddr[0] == 0xfe && (f->saddr[1] & 0xc0) == 0x80) || addr_zero(f->saddr))
		return (f->daddr[0] == 0xff && (f->daddr[1] & 0x0f) <= 2) ||
		       (f->daddr[0] == 0xfe && (f->daddr[1] & 0xc0) == 0x80);
	return 0;
}

static __always_inline int link_scoped(const __u8 *a)
{
	/* fe80::/10 (link-local unicast) or ff02::/16 (link-scope multicast). */
	return (a[0] == 0xfe && (a[1] & 0xc0) == 0x80) || (a[0] == 0xff && a[1] == 0x02);
}

/* Whether an ND-shaped packet (type 133-137, hop limit 255) stays on the veth's link and so
 * passes without policy. Leaving the endpoint: only to link-local or link-scope multicast
 * destinations; the host forwards ND types sent to any other address, so those would leave
 * past egress policy. Entering it: also to the endpoint's own address (the host's NA to an
 * endpoint that solicited from it, its unicast reachability probes); hop limit 255 there means
 * the host's own stack sent it, as a forwarded packet has a lower one. */
static __always_inline int nd_on_link(const struct endpoint_config *cfg, const struct flow *f,
				      __u8 direction)
{
	if (link_scoped(f->daddr))
		return 1;
	return direction == DIR_INGRESS && cfg && (cfg->flags & EP_HAS_IPV6) &&
	       addr_eq(f->daddr, cfg->ipv6, 16);
}

/* Whether a packet entering an endpoint came from where its source lives. A local endpoint's
 * address is only ever sent from that endpoint's veth (where source_ok checked it), so that is
 * the only interface such a packet may have arrived on (ingress_ifindex; 0 for packets the
 * host sends itself): else a host user who bound the address with IP_FREEBIND / IPV6_FREEBIND
 * (no capability needed) would borrow the endpoint's identity and its connections.
 * A subprogram of its own: inlined, its key pushes sigil_from_ep's frame past 512 bytes. */
static __attribute__((noinline)) int sender_ok(const struct __sk_buff *skb, const struct flow *f)
{
	struct ep_addr_key k = {};
	__u32 *owner;

	k.family = f->family;
	__builtin_memcpy(k.addr, f->saddr, 16);
	owner = bpf_map_lookup_elem(&sigil_ep_addrs, &k);
	return !owner || *owner == skb->ingress_ifindex;
}

/* What the IPCache says about an address: identity (world when absent), flags and, for
 * addresses on other nodes, the tunnel endpoint (network order, as a __u32). */
struct peer {
	__u32 identity;
	__u32 flags;
	__u32 tunnel_endpoint;
};

static __attribute__((noinline)) int lookup_peer(const __u8 *addr, __u32 family, struct peer *p)
{
	struct ipcache_key k = {};
	struct ipcache_value *v;

	k.family = family;
	k.prefixlen = 32 + (family == 4 ? 32 : 128);
	__builtin_memcpy(k.addr, addr, 16);
	v = bpf_map_lookup_elem(&sigil_ipcache, &k);
	if (!v) {
		p->identity = IDENTITY_WORLD;
		p->flags = 0;
		p->tunnel_endpoint = 0;
		return 0;
	}
	p->identity = v->identity;
	p->flags = v->flags;
	__builtin_memcpy(&p->tunnel_endpoint, v->tunnel_endpoint, 4);
	return 1;
}

static __always_inline __u32 lookup_identity(__u8 family, const __u8 *addr)
{
	struct peer p = {};

	lookup_peer(addr, family, &p);
	return p.identity;
}

static __always_inline struct tunnel_config *tunnel_config(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&sigil_tunnel, &zero);
}

/* Whether an identity may travel in a VNI: remote-node (a node's own traffic) or a cluster
 * identity. 0, the other reserved identities and node-local ones (bit 24 and up) may not. */
static __always_inline int vni_ok(__u32 identity)
{
	return identity == IDENTITY_REMOTE_NODE ||
	       (identity >= IDENTITY_CLUSTER_MIN && identity <= IDENTITY_VNI_MAX);
}

/* The tunnel endpoint (network order) of a peer on another node, 0 for local ones. A node
 * entry of this node itself (its own underlay address) is local. */
static __always_inline __u32 remote_endpoint(const struct peer *p, const struct tunnel_config *t)
{
	__u32 local = 0;

	if (!(p->flags & (IPCACHE_F_TUNNEL | IPCACHE_F_NODE)) || !p->tunnel_endpoint)
		return 0;
	if (t)
		__builtin_memcpy(&local, t->local_ipv4, 4);
	return p->tunnel_endpoint == local ? 0 : p->tunnel_endpoint;
}

static __always_inline void count(__u32 ep, __u8 verdict, __u32 len)
{
	struct counter_key k = {};
	struct counter_value *v;

	k.endpoint_id = ep;
	k.verdict = verdict;
	v = bpf_map_lookup_elem(&sigil_counters, &k);
	if (v) {
		v->packets += 1;
		v->bytes += len;
	} else {
		struct counter_value init = { .packets = 1, .bytes = len };

		bpf_map_update_elem(&sigil_counters, &k, &init, BPF_NOEXIST);
	}
}

struct ctx {
	__u64 now;
	__u32 ep;
	__u32 src_identity;
	__u32 dst_identity;
	__u32 flags;           /* EVENT_F_* */
	__u32 tunnel_endpoint; /* leaving: the destination's node (network order), 0 = local */
	__u32 tunnel_ifindex;  /* leaving: the tunnel device */
	__u32 tunnel_local;    /* leaving: this node's underlay address (network order) */
	__u32 remote_node;     /* the peer's node (network order), 0 = this node: auth key */
	__u8 direction;
	__u8 auth_required; /* set once the deciding entry is known */
};

static __always_inline void emit(const struct ctx *c, const struct flow *f, __u8 verdict,
				 __u32 reason, __u32 cookie)
{
	struct event *e = bpf_ringbuf_reserve(&sigil_events, sizeof(*e), 0);

	if (!e) {
		__u32 zero = 0;
		__u64 *lost = bpf_map_lookup_elem(&sigil_ev_lost, &zero);

		if (lost)
			*lost += 1;
		return;
	}
	e->ts_ns = c->now;
	e->endpoint_id = c->ep;
	e->src_identity = c->src_identity;
	e->dst_identity = c->dst_identity;
	e->family = f->family;
	e->protocol = f->protocol;
	e->direction = c->direction;
	e->verdict = verdict;
	e->sport = bswap16(f->sport);
	e->dport = bswap16(f->dport);
	__builtin_memcpy(e->saddr, f->saddr, 16);
	__builtin_memcpy(e->daddr, f->daddr, 16);
	e->drop_reason = reason;
	e->rule_cookie = cookie;
	e->flags = c->flags;
	e->tcp_flags = f->tcp_flags;
	e->auth_required = c->auth_required;
	__builtin_memset(e->pad, 0, sizeof(e->pad));
	bpf_ringbuf_submit(e, 0);
}

static __always_inline int ct_alive(const struct ct_value *v, __u8 protocol, __u64 now)
{
	__u64 lifetime = CT_LIFETIME_OTHER_NS;

	/* Another CPU may have stamped the entry after this packet read the clock. */
	if (v->last_seen_ns >= now)
		return 1;
	if (v->flags & CT_CLOSING)
		lifetime = CT_LIFETIME_CLOSING_NS;
	else if (protocol == IPPROTO_TCP)
		lifetime = CT_LIFETIME_TCP_NS;
	return now - v->last_seen_ns < lifetime;
}

struct decision {
	__u32 drop_reason; /* 0 = allow */
	__u32 cookie;
	__u8 auth_required;
};

static __always_inline void decide(struct decision *d, const struct ctx *c,
				   const struct flow *f, __u32 remote_identity,
				   __u32 local_identity, const struct endpoint_config *cfg)
{
	struct policy_key k = {};
	struct policy_value *exact, *any = 0;

	k.prefixlen = 96;
	k.endpoint_id = c->ep;
	k.remote_identity = remote_identity;
	k.direction = c->direction;
	k.protocol = f->protocol;
	k.dport = f->dport;
	exact = bpf_map_lookup_elem(&sigil_policy, &k);
	if (remote_identity != 0) {
		k.remote_identity = 0;
		any = bpf_map_lookup_elem(&sigil_policy, &k);
	}

	d->drop_reason = 0;
	d->cookie = 0;
	d->auth_required = 0;
	if (exact && exact->deny) {
		d->drop_reason = DROP_POLICY_DENY;
		d->cookie = exact->rule_cookie;
	} else if (any && any->deny) {
		d->drop_reason = DROP_POLICY_DENY;
		d->cookie = any->rule_cookie;
	} else if (exact || any) {
		int auth = (exact && exact->auth_required) || (any && any->auth_required);

		d->cookie = exact ? exact->rule_cookie : any->rule_cookie;
		d->auth_required = auth;
		if (auth) {
			struct auth_key ak = {};
			struct auth_value *av;

			ak.local_identity = local_identity;
			ak.remote_identity = remote_identity;
			/* The node is part of the key: a pair authenticated with one node says
			 * nothing about the same identities reached through another (an address
			 * reused there while this node's IPCache is stale). */
			ak.remote_node = c->remote_node;
			av = bpf_map_lookup_elem(&sigil_auth, &ak);
			if (!av || av->expiry_ns < c->now)
				d->drop_reason = DROP_AUTH_REQUIRED;
		}
	} else if (cfg && (c->direction == DIR_INGRESS ? cfg->ingress_enforced
						       : cfg->egress_enforced)) {
		d->drop_reason = DROP_POLICY_DENIED;
	}
}

static __always_inline void frag_key_of(struct frag_key *k, const struct ctx *c,
					const struct flow *f)
{
	k->endpoint_id = c->ep;
	k->family = f->family;
	k->direction = c->direction;
	k->nexthdr = f->frag_nexthdr;
	k->id = f->frag_id;
	__builtin_memcpy(k->saddr, f->saddr, 16);
	__builtin_memcpy(k->daddr, f->daddr, 16);
}

/* After the verdict on a first fragment: its later fragments get its flow if it passed, and
 * nothing (so they drop where enforced) if it did not. */
static __always_inline void frag_note(const struct ctx *c, const struct flow *f, int passed)
{
	struct frag_key k = {};

	if (f->frag != FRAG_FIRST)
		return;
	frag_key_of(&k, c, f);
	if (passed) {
		struct frag_value v = {};

		v.seen_ns = c->now;
		v.protocol = f->protocol;
		v.sport = f->sport;
		v.dport = f->dport;
		bpf_map_update_elem(&sigil_frag, &k, &v, BPF_ANY);
	} else {
		bpf_map_delete_elem(&sigil_frag, &k);
	}
}

static __always_inline int drop(struct __sk_buff *skb, const struct ctx *c, const struct flow *f,
				__u32 reason, __u32 cookie)
{
	count(c->ep, VERDICT_DROPPED, skb->len);
	emit(c, f, VERDICT_DROPPED, reason, cookie);
	return TC_ACT_SHOT;
}

/* `tunneled`: the flow of a packet a tunnel program (sigil_from_tunnel, sigil_from_underlay)
 * checked and delivers itself (deliver); c->ep (the destination endpoint), c->src_identity (the
 * VNI) and c->remote_node (the outer source) are already set. NULL otherwise: the packet is
 * parsed here and the endpoint is the host veth it is on. */
static __always_inline int handle(struct __sk_buff *skb, __u8 direction, struct ctx *c,
				  const struct flow *tunneled)
{
	struct flow f = {};
	struct ct_key key = {};
	struct ct_value *ct;
	struct endpoint_config *cfg;
	struct tunnel_config *t;
	struct peer remote = {};
	struct decision d;
	enum parse_result parsed;
	__u32 local_identity, remote_identity;
	__u8 closing;
	int enforced, from_tunnel = 0;

	if (tunneled) {
		/* Parsed by the tunnel program (delivered_here: IP). */
		f = *tunneled;
		parsed = PARSE_IP;
	} else {
		parsed = parse(skb, &f);
		if (parsed == PARSE_PASS)
			return TC_ACT_OK;
	}

	c->now = bpf_ktime_get_boot_ns();
	if (!tunneled)
		c->ep = skb->ifindex;
	c->direction = direction;
	cfg = bpf_map_lookup_elem(&sigil_endpoints, &c->ep);
	t = tunnel_config();
	if (direction == DIR_EGRESS) {
		local_identity = cfg ? cfg->identity : lookup_identity(f.family, f.saddr);
		lookup_peer(f.daddr, f.family, &remote);
		remote_identity = remote.identity;
		c->tunnel_endpoint = remote_endpoint(&remote, t);
		c->remote_node = c->tunnel_endpoint;
		if (c->tunnel_endpoint) {
			c->flags |= EVENT_F_TUNNEL;
			if (t) {
				c->tunnel_ifindex = t->ifindex;
				__builtin_memcpy(&c->tunnel_local, t->local_ipv4, 4);
			}
		}
		c->src_identity = local_identity;
		c->dst_identity = remote_identity;
	} else {
		local_identity = cfg ? cfg->identity : lookup_identity(f.family, f.daddr);
		/* A packet the tunnel programs deliver has its identity from the VNI, and its
		 * source was checked against the IPCache there (carrier_check). */
		if (!tunneled)
			lookup_peer(f.saddr, f.family, &remote);
		remote_identity = remote.identity;
		if (tunneled) {
			from_tunnel = 1;
			c->flags |= EVENT_F_TUNNEL;
			remote_identity = c->src_identity;
		} else if (t && t->ifindex && skb->ingress_ifindex == t->ifindex) {
			/* Only a packet that arrived on the tunnel device carries the identity its
			 * VNI gave (in the mark, set by sigil_from_tunnel when it leaves the packet
			 * to the stack); anything else's mark is not looked at. */
			from_tunnel = 1;
			c->flags |= EVENT_F_TUNNEL;
			/* sigil_from_tunnel let it in only if this is its outer source. */
			c->remote_node = remote.tunnel_endpoint;
			remote_identity = (skb->mark & MARK_MAGIC_MASK) == MARK_MAGIC_IDENTITY
						  ? skb->mark & MARK_IDENTITY_MASK
						  : 0;
		}
		c->src_identity = remote_identity;
		c->dst_identity = local_identity;
	}

	/* Before anything else, conntrack included: a packet that leaves an endpoint with
	 * another's address would get that endpoint's identity, policy and connections; so would
	 * one entering an endpoint with a local endpoint's address that it was not sent from, or
	 * with the address of something on another node that did not come through the tunnel. */
	if (direction == DIR_EGRESS && !source_ok(cfg, &f))
		return drop(skb, c, &f, DROP_INVALID_SIP, 0);
	if (direction == DIR_INGRESS) {
		if (!tunneled && !sender_ok(skb, &f))
			return drop(skb, c, &f, DROP_INVALID_SIP, 0);
		if (from_tunnel && !vni_ok(remote_identity))
			return drop(skb, c, &f, DROP_INVALID_IDENTITY, 0);
		if (!from_tunnel && remote_endpoint(&remote, t))
			return drop(skb, c, &f, DROP_INVALID_SIP, 0);
	}
	/* The VNI carries cluster identities only: node-local ones never go on the wire. */
	if (c->tunnel_endpoint) {
		if (!vni_ok(local_identity))
			return drop(skb, c, &f, DROP_INVALID_IDENTITY, 0);
		if (!c->tunnel_ifindex)
			return drop(skb, c, &f, DROP_NO_TUNNEL, 0);
	}
	if (parsed == PARSE_ND) {
		if (nd_on_link(cfg, &f, direction))
			return TC_ACT_OK;
		parsed = PARSE_IP;
	}
	if (parsed == PARSE_BAD)
		return drop(skb, c, &f, f.bad_reason, 0);

	enforced = cfg && (direction == DIR_INGRESS ? cfg->ingress_enforced : cfg->egress_enforced);
	if (f.frag == FRAG_LATER) {
		struct frag_key fk = {};
		struct frag_value *fv;

		frag_key_of(&fk, c, &f);
		fv = bpf_map_lookup_elem(&sigil_frag, &fk);
		/* Another CPU may have stamped the entry after this packet read the clock. */
		if (fv && (fv->seen_ns >= c->now || c->now - fv->seen_ns < FRAG_LIFETIME_NS)) {
			f.protocol = fv->protocol;
			f.sport = fv->sport;
			f.dport = fv->dport;
		} else if (enforced) {
			/* Its flow is unknown, so no entry can be said to allow it. */
			return drop(skb, c, &f, DROP_FRAG_NOT_FOUND, 0);
		}
	}
	closing = (f.tcp_flags & (TCP_FIN | TCP_RST)) ? CT_CLOSING : 0;

	/* A reply: the reversed tuple was opened in the other direction. Replies are not
	 * policy-checked; the opening direction is, on every packet. */
	key.endpoint_id = c->ep;
	key.family = f.family;
	key.protocol = f.protocol;
	key.direction = direction ^ 1;
	__builtin_memcpy(key.saddr, f.daddr, 16);
	__builtin_memcpy(key.daddr, f.saddr, 16);
	key.sport = f.dport;
	key.dport = f.sport;
	ct = bpf_map_lookup_elem(&sigil_ct, &key);
	if (ct && ct_alive(ct, f.protocol, c->now)) {
		ct->last_seen_ns = c->now;
		ct->flags |= closing;
		if (!(ct->flags & CT_SEEN_REPLY)) {
			ct->flags |= CT_SEEN_REPLY;
			emit(c, &f, VERDICT_ALLOWED_REPLY, 0, 0);
		}
		frag_note(c, &f, 1);
		count(c->ep, VERDICT_ALLOWED_REPLY, skb->len);
		return TC_ACT_OK;
	}

	key.direction = direction;
	__builtin_memcpy(key.saddr, f.saddr, 16);
	__builtin_memcpy(key.daddr, f.daddr, 16);
	key.sport = f.sport;
	key.dport = f.dport;

	decide(&d, c, &f, remote_identity, local_identity, cfg);
	c->auth_required = d.auth_required;
	if (d.drop_reason) {
		/* Forget the connection so its replies stop passing as replies. */
		bpf_map_delete_elem(&sigil_ct, &key);
		frag_note(c, &f, 0);
		return drop(skb, c, &f, d.drop_reason, d.cookie);
	}

	ct = bpf_map_lookup_elem(&sigil_ct, &key);
	if (ct && ct_alive(ct, f.protocol, c->now)) {
		ct->last_seen_ns = c->now;
		ct->flags |= closing;
	} else if (f.protocol == IPPROTO_TCP && (f.tcp_flags & (TCP_SYN | TCP_ACK)) != TCP_SYN) {
		/* Only an opening SYN opens a TCP connection. Otherwise a packet in the reverse
		 * direction of a connection that a policy or identity change has just cut (an ACK,
		 * a late reply) would open it anew as the other side's, and the cut side's packets
		 * would pass as its replies. Allowed, but tracked as nothing (and not reported:
		 * only new connections are). */
	} else {
		struct ct_value fresh = {};

		fresh.created_ns = c->now;
		fresh.last_seen_ns = c->now;
		fresh.flags = closing;
		bpf_map_update_elem(&sigil_ct, &key, &fresh, BPF_ANY);
		emit(c, &f, VERDICT_ALLOWED, 0, d.cookie);
	}
	frag_note(c, &f, 1);
	count(c->ep, VERDICT_ALLOWED, skb->len);
	return TC_ACT_OK;
}

/* Encapsulation towards another node through the VXLAN device: the tunnel key carries the
 * source identity as VNI and the destination's node as remote; the device (collect metadata)
 * builds the outer headers and routes them on the underlay. The outer UDP checksum is zero, as
 * Cilium sends it (RFC 7348 allows it over IPv4): the inner packet carries its own checksum,
 * and integrity against an attacker is the encrypted carrier's job, not a checksum's. */
#define BPF_F_ZERO_CSUM_TX (1ULL << 1)
static __attribute__((noinline)) int encap(struct __sk_buff *skb, __u32 identity, __u32 remote,
					   __u32 local, __u32 ifindex)
{
	struct bpf_tunnel_key key = {};

	key.tunnel_id = identity;
	key.remote_ipv4 = __builtin_bswap32(remote);
	key.local_ipv4 = __builtin_bswap32(local);
	key.tunnel_ttl = TUNNEL_TTL;
	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), BPF_F_ZERO_CSUM_TX) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect(ifindex, 0);
}

static long (*bpf_skb_adjust_room)(void *skb, int len_diff, __u32 mode, __u64 flags) = (void *)50;
static long (*bpf_redirect_neigh)(__u32 ifindex, void *params, int plen, __u64 flags) = (void *)152;
static long long (*bpf_csum_diff)(__be32 *from, __u32 from_size, __be32 *to, __u32 to_size,
				  __u32 seed) = (void *)28;
static long (*bpf_check_mtu)(void *skb, __u32 ifindex, __u32 *mtu_len, int len_diff,
			     __u64 flags) = (void *)163;
static __u32 (*bpf_get_hash_recalc)(void *skb) = (void *)34;
static __u32 (*bpf_get_prandom_u32)(void) = (void *)7;
static long (*bpf_fib_lookup)(void *skb, void *params, int plen, __u32 flags) = (void *)69;

/* The kernel's struct bpf_fib_lookup and struct bpf_redir_neigh (UAPI), IPv4 members named. */
struct bpf_fib_lookup {
	__u8 family;
	__u8 l4_protocol;
	__be16 sport;
	__be16 dport;
	__u16 tot_len; /* in: L3 length to check against the route's MTU; out: the MTU */
	__u32 ifindex; /* in: the packet's device; out: the egress device */
	__u32 tos;
	__be32 ipv4_src;
	__u32 ipv6_src_rest[3];
	__be32 ipv4_dst; /* out: the next hop */
	__u32 ipv6_dst_rest[3];
	__u32 vlan;
	__u8 smac[6];
	__u8 dmac[6];
};

struct bpf_redir_neigh {
	__u32 nh_family;
	__be32 ipv4_nh;
	__u32 ipv6_nh_rest[3];
};

#define AF_INET 2
#define BPF_FIB_LOOKUP_OUTPUT (1U << 1)
#define BPF_FIB_LOOKUP_SKIP_NEIGH (1U << 2)
#define BPF_FIB_LKUP_RET_SUCCESS 0

#define BPF_ADJ_ROOM_MAC 1
#define BPF_F_ADJ_ROOM_FIXED_GSO (1ULL << 0)
#define BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 (1ULL << 1)
#define BPF_F_ADJ_ROOM_ENCAP_L4_UDP (1ULL << 4)
#define BPF_F_ADJ_ROOM_ENCAP_L2_ETH (1ULL << 6)
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV6 (1ULL << 8)
/* Newer than 6.18: also clears the skb's UDP-tunnel offload state, as the VXLAN device does. */
#define BPF_F_ADJ_ROOM_DECAP_L4_UDP (1ULL << 10)
#define BPF_F_ADJ_ROOM_ENCAP_L2(len) (((__u64)(len) & 0xff) << 56)
#define BPF_MTU_CHK_SEGS 1

/* What VXLAN puts between the outer Ethernet header and the inner packet's IP header: outer
 * IPv4, UDP, VXLAN, and the inner frame's Ethernet header. The same bytes on the wire as the
 * VXLAN device's (RFC 7348; VNI = source identity). */
struct vxlan_encap {
	__u8 ip[20];
	__u8 udp[8];
	__u8 vxlan[8];
	__u8 eth[14];
};
#define ENCAP_LEN 50
#define INNER_L3 (14 + ENCAP_LEN)
#define VXLAN_FLAG_VNI 0x08 /* RFC 7348's I flag: the only one set */
/* Outer UDP source ports: the kernel's default ephemeral range, as the VXLAN device picks. */
#define SPORT_MIN 32768
#define SPORT_SPAN 28232
#define ECN_MASK 3
#define ECN_ECT_0 2
#define ECN_CE 3

static __always_inline __u16 csum_fold(long long partial)
{
	__u32 sum = (__u32)partial;

	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* The ECN bits of the packet's IP header at `l3` (IPv4 TOS, IPv6 traffic class). */
static __always_inline __u8 ecn_at(struct __sk_buff *skb, __u32 l3)
{
	__u8 b[2] = {};

	if (bpf_skb_load_bytes(skb, l3, b, sizeof(b)) < 0)
		return 0;
	return (b[0] >> 4) == 4 ? b[1] & ECN_MASK : (b[1] >> 4) & ECN_MASK;
}

/* Whether the programs may send this packet to `remote` themselves, and where to (*next_hop:
 * the route's next hop, network order): only if it fits the underlay once encapsulated (the
 * VXLAN device fragments what does not) and the route to the remote node (routing rules
 * included, though not fwmark rules, and one ECMP path for all flows) leaves by the underlay
 * device through an IPv4 next hop. A subprogram of its own, beside encap_direct, so their
 * frames are not stacked. */
static __attribute__((noinline)) int direct_route(struct __sk_buff *skb, __u32 remote,
						  const struct tunnel_config *t, __u32 *next_hop)
{
	struct bpf_fib_lookup fib = {};
	__u32 mtu = 0;

	if (!t || !t->underlay_ifindex)
		return 0;
	/* The VXLAN device's MTU is the underlay's less ENCAP_LEN: what fits it fits after. */
	if (bpf_check_mtu(skb, t->ifindex, &mtu, 0, BPF_MTU_CHK_SEGS) != 0)
		return 0;
	fib.family = AF_INET;
	fib.l4_protocol = IPPROTO_UDP;
	fib.dport = t->port;
	/* As if forwarded from the endpoint's veth (an input lookup): an output lookup pinned to
	 * the underlay device would never see a route that leaves by another one. */
	fib.ifindex = skb->ifindex;
	/* GSO segments were checked above; a whole packet is checked against the route here. */
	fib.tot_len = skb->gso_size ? 20 + 8 + 8 : skb->len - 14 + ENCAP_LEN;
	__builtin_memcpy(&fib.ipv4_src, t->local_ipv4, 4);
	fib.ipv4_dst = remote;
	if (bpf_fib_lookup(skb, &fib, sizeof(fib),
			   BPF_FIB_LOOKUP_SKIP_NEIGH) != BPF_FIB_LKUP_RET_SUCCESS ||
	    fib.ifindex != t->underlay_ifindex || fib.family != AF_INET)
		return 0;
	*next_hop = fib.ipv4_dst;
	return 1;
}

/* Encapsulation by the program itself, onto the underlay device (direct_route said yes): the
 * outer headers written in place (bpf_skb_adjust_room keeps GSO and checksum offload working
 * on the inner packet) and the frame sent to the next hop, whose address
 * bpf_redirect_neigh resolves. This skips the VXLAN device's transmit path. Returns -1, with
 * the packet untouched, if the VXLAN device must carry it after all. */
static __attribute__((noinline)) int encap_direct(struct __sk_buff *skb, __u32 identity,
						  __u32 remote, const struct tunnel_config *t,
						  __u32 next_hop)
{
	struct vxlan_encap h = {};
	struct bpf_redir_neigh nh = {};
	__be16 outer_proto = bswap16(ETH_P_IP);
	__u32 sport, id;
	__u16 tot, ulen, csum;
	__u8 ecn;

	if (!t)
		return -1;
	nh.nh_family = AF_INET;
	nh.ipv4_nh = next_hop;
	if (bpf_skb_load_bytes(skb, 0, h.eth, sizeof(h.eth)) < 0)
		return -1;
	ecn = ecn_at(skb, 14);
	/* The source port spreads flows over the underlay's paths and queues (RFC 7348); the
	 * flow hash is taken before the new headers are there. */
	sport = SPORT_MIN + (__u32)(((__u64)bpf_get_hash_recalc(skb) * SPORT_SPAN) >> 32);
	if (bpf_skb_adjust_room(skb, ENCAP_LEN, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 |
					BPF_F_ADJ_ROOM_ENCAP_L4_UDP | BPF_F_ADJ_ROOM_ENCAP_L2_ETH |
					BPF_F_ADJ_ROOM_ENCAP_L2(14)) < 0)
		return -1;
	tot = skb->len - 14;
	ulen = tot - 20;
	id = bpf_get_prandom_u32();
	h.ip[0] = 0x45;
	/* ECN as the device encapsulates it (RFC 6040): copied out, CE as ECT(0). */
	h.ip[1] = ecn == ECN_CE ? ECN_ECT_0 : ecn;
	h.ip[2] = tot >> 8;
	h.ip[3] = tot & 0xff;
	h.ip[4] = id >> 8;
	h.ip[5] = id & 0xff;
	h.ip[8] = TUNNEL_TTL;
	h.ip[9] = IPPROTO_UDP;
	__builtin_memcpy(&h.ip[12], t->local_ipv4, 4);
	__builtin_memcpy(&h.ip[16], &remote, 4);
	csum = csum_fold(bpf_csum_diff(0, 0, (__be32 *)h.ip, sizeof(h.ip), 0));
	__builtin_memcpy(&h.ip[10], &csum, 2);
	h.udp[0] = sport >> 8;
	h.udp[1] = sport & 0xff;
	__builtin_memcpy(&h.udp[2], &t->port, 2);
	h.udp[4] = ulen >> 8;
	h.udp[5] = ulen & 0xff;
	/* Checksum zero, as the device sends it (see encap). */
	h.vxlan[0] = VXLAN_FLAG_VNI;
	h.vxlan[4] = (identity >> 16) & 0xff;
	h.vxlan[5] = (identity >> 8) & 0xff;
	h.vxlan[6] = identity & 0xff;
	if (bpf_skb_store_bytes(skb, 14, &h, sizeof(h), 0) < 0 ||
	    bpf_skb_store_bytes(skb, 12, &outer_proto, sizeof(outer_proto), 0) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect_neigh(t->underlay_ifindex, &nh, sizeof(nh), 0);
}

SEC("classifier")
int sigil_from_ep(struct __sk_buff *skb)
{
	struct ctx c = {};
	struct tunnel_config *t;
	__u32 next_hop = 0;
	int verdict = handle(skb, DIR_EGRESS, &c, 0);

	/* Everything that passes towards another node's address goes into the tunnel: new
	 * connections, replies and untracked packets alike. */
	if (verdict != TC_ACT_OK || !c.tunnel_endpoint)
		return verdict;
	t = tunnel_config();
	if (direct_route(skb, c.tunnel_endpoint, t, &next_hop)) {
		verdict = encap_direct(skb, c.src_identity, c.tunnel_endpoint, t, next_hop);
		if (verdict >= 0)
			return verdict;
	}
	return encap(skb, c.src_identity, c.tunnel_endpoint, c.tunnel_local, c.tunnel_ifindex);
}

SEC("classifier")
int sigil_to_ep(struct __sk_buff *skb)
{
	struct ctx c = {};

	return handle(skb, DIR_INGRESS, &c, 0);
}

/* Where a packet that came out of the tunnel is for: a local endpoint (its id), this node's
 * own underlay address (FOR_NODE), or neither (0). Anything else would be relayed (to the
 * underlay, or back into the tunnel) under a source the sender chose. */
#define FOR_NODE 0xffffffff
static __attribute__((noinline)) __u32 for_this_node(const struct flow *f,
						     const struct tunnel_config *t)
{
	struct ep_addr_key k = {};
	__u32 *ep;

	if (f->family == 4 && t && addr_eq(f->daddr, t->local_ipv4, 4))
		return FOR_NODE;
	k.family = f->family;
	__builtin_memcpy(k.addr, f->daddr, 16);
	ep = bpf_map_lookup_elem(&sigil_ep_addrs, &k);
	return ep ? *ep : 0;
}

#define BPF_F_RECOMPUTE_CSUM (1ULL << 0)

/* What IP forwarding would have done to the packet on its way into the endpoint: one hop off
 * its TTL / hop limit. 0 when it has no hop left (the stack then answers as a router does). */
static __always_inline int hop(struct __sk_buff *skb, const struct flow *f)
{
	__u8 left;

	if (f->hop_limit <= 1)
		return 0;
	left = f->hop_limit - 1;
	if (f->family == 4) {
		__u16 was = bswap16(((__u16)f->hop_limit << 8) | f->protocol);
		__u16 now = bswap16(((__u16)left << 8) | f->protocol);

		if (bpf_l3_csum_replace(skb, 14 + 10, was, now, 2) < 0)
			return 0;
		return bpf_skb_store_bytes(skb, 14 + 8, &left, 1, 0) == 0;
	}
	/* No header checksum; a CHECKSUM_COMPLETE sum over the packet is kept right. */
	return bpf_skb_store_bytes(skb, 14 + 7, &left, 1, BPF_F_RECOMPUTE_CSUM) == 0;
}

/* The checks every packet out of the carrier passes, whichever way it came in: the outer
 * source is a cluster node, the VNI a cluster identity or 6, the inner packet IP, its source an
 * address that node hosts and its destination something on this node. 0 (and the destination
 * in *ep: a local endpoint's id or FOR_NODE) when it may come in, else the drop reason. */
static __always_inline __u32 carrier_check(const struct flow *f, enum parse_result parsed,
					   __u32 outer_be, __u32 vni,
					   const struct tunnel_config *t, __u32 *ep)
{
	struct peer p = {};
	__u8 outer[16] = {};

	__builtin_memcpy(outer, &outer_be, 4);
	if (!lookup_peer(outer, 4, &p) || !(p.flags & IPCACHE_F_NODE))
		return DROP_UNKNOWN_SENDER;
	if (!vni_ok(vni))
		return DROP_INVALID_IDENTITY;
	if (parsed == PARSE_PASS)
		return DROP_INVALID;
	/* A node speaks for the addresses it hosts (its endpoints, itself), not for another
	 * node's: else it could pass its packets off as replies of their connections. */
	lookup_peer(f->saddr, f->family, &p);
	if (!(p.flags & (IPCACHE_F_TUNNEL | IPCACHE_F_NODE)) || p.tunnel_endpoint != outer_be)
		return DROP_INVALID_SIP;
	*ep = for_this_node(f, t);
	if (!*ep)
		return DROP_NO_LOCAL_ENDPOINT;
	return 0;
}

/* Whether the programs deliver a checked packet from the carrier themselves: IP (not
 * neighbour discovery, not unparsable) to a local endpoint, with a hop left. */
static __always_inline int delivered_here(const struct flow *f, enum parse_result parsed,
					  __u32 ep)
{
	return ep != FOR_NODE && parsed == PARSE_IP && f->hop_limit > 1;
}

/* A checked packet from the carrier (its frame at offset 0) for local endpoint `ep`: the hop
 * IP forwarding would take, the endpoint's ingress policy with the VNI's identity (c), and
 * straight into its namespace: no pass through this node's stack, and sigil_to_ep does not
 * see it. The mark is cleared so nothing of the carrier reaches the endpoint. */
static __always_inline int deliver(struct __sk_buff *skb, struct ctx *c, const struct flow *f,
				   __u32 ep, __u32 outer_be)
{
	int verdict;

	c->ep = ep;
	c->remote_node = outer_be;
	/* The hop first, so a packet is reported once: dropped here, or by its policy. */
	if (!hop(skb, f)) {
		c->now = bpf_ktime_get_boot_ns();
		return drop(skb, c, f, DROP_INVALID, 0);
	}
	verdict = handle(skb, DIR_INGRESS, c, f);
	if (verdict != TC_ACT_OK)
		return verdict;
	skb->mark = 0;
	/* The inner frame is addressed to the sender's host veth; the endpoint's stack must
	 * take it as its own (as the routed path's host veth would have). */
	bpf_skb_change_type(skb, PACKET_HOST);
	return bpf_redirect_peer(ep, 0);
}

/* At the VXLAN device's ingress: packets from other nodes that the kernel decapsulated. The
 * VNI is the source identity; carrier_check decides whether the packet may come in. Packets
 * for local endpoints are delivered here (deliver); the rest goes to the stack, the identity
 * in skb->mark for sigil_to_ep, which trusts it only for packets that arrived on this device. */
SEC("classifier")
int sigil_from_tunnel(struct __sk_buff *skb)
{
	struct bpf_tunnel_key key = {};
	struct flow f = {};
	struct ctx c = {};
	__u32 outer_be, ep = 0, reason;
	enum parse_result parsed;

	parsed = parse(skb, &f);
	c.now = bpf_ktime_get_boot_ns();
	c.ep = skb->ifindex;
	c.direction = DIR_INGRESS;
	c.flags = EVENT_F_TUNNEL;
	if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) < 0)
		return drop(skb, &c, &f, DROP_NO_TUNNEL_KEY, 0);
	c.src_identity = key.tunnel_id;
	outer_be = __builtin_bswap32(key.remote_ipv4);
	reason = carrier_check(&f, parsed, outer_be, key.tunnel_id, tunnel_config(), &ep);
	if (reason)
		return drop(skb, &c, &f, reason, 0);
	if (delivered_here(&f, parsed, ep))
		return deliver(skb, &c, &f, ep, outer_be);
	/* Else (this node, no hop left, neighbour discovery) the stack takes it: to this node,
	 * or routed to the endpoint whose sigil_to_ep reads the identity from the mark. */
	skb->mark = MARK_MAGIC_IDENTITY | key.tunnel_id;
	/* The inner frame is addressed to the sending endpoint's host veth, not to this device;
	 * the stack would discard it as another host's. */
	bpf_skb_change_type(skb, PACKET_HOST);
	return TC_ACT_OK;
}

/* At the underlay device's ingress, when the programs encapsulate themselves
 * (tunnel_config.underlay_ifindex): VXLAN packets for a local endpoint are decapsulated and
 * delivered here, past the kernel's UDP socket, VXLAN receive and GRO cell queue. Only a packet
 * that is plainly well formed (IPv4 without options or fragmentation, to this node's address,
 * right length and header checksum, the carrier's port, zero UDP checksum, only the VXLAN I
 * flag) and that passes carrier_check and delivered_here is taken; everything else goes on
 * untouched (TC_ACT_UNSPEC: the next filter, then the stack) and, if it is VXLAN, reaches the
 * VXLAN device and sigil_from_tunnel, which drop what carrier_check refuses with its reason. */
SEC("classifier")
int sigil_from_underlay(struct __sk_buff *skb)
{
	struct {
		__u8 ip[20];
		__u8 udp[8];
		__u8 vxlan[8];
	} o;
	struct flow f = {};
	struct ctx c = {};
	struct tunnel_config *t;
	__be16 inner_proto;
	__u64 flags;
	__u32 outer_be, vni, ep = 0;
	enum parse_result parsed;
	__u16 tot;

	t = tunnel_config();
	if (!t || !t->underlay_ifindex || skb->ifindex != t->underlay_ifindex)
		return TC_ACT_UNSPEC;
	/* Only untagged frames addressed to this host: the stack drops the others (promiscuous
	 * mode, a VLAN this host does not have). */
	if (skb->pkt_type != PACKET_HOST || skb->vlan_present ||
	    skb->protocol != bswap16(ETH_P_IP))
		return TC_ACT_UNSPEC;
	if (bpf_skb_load_bytes(skb, 14, &o, sizeof(o)) < 0)
		return TC_ACT_UNSPEC;
	__builtin_memcpy(&outer_be, &o.ip[12], 4);
	/* Congestion marked on the way: the device applies it to the inner packet (RFC 6040). */
	if (o.ip[0] != 0x45 || o.ip[9] != IPPROTO_UDP || (o.ip[6] & 0x3f) || o.ip[7] ||
	    (o.ip[1] & ECN_MASK) == ECN_CE || !addr_eq(&o.ip[16], t->local_ipv4, 4))
		return TC_ACT_UNSPEC;
	tot = ((__u16)o.ip[2] << 8) | o.ip[3];
	/* The stack checks these before anything reads the packet; so do we. */
	if (tot != skb->len - 14 || csum_fold(bpf_csum_diff(0, 0, (__be32 *)o.ip, 20, 0)) != 0)
		return TC_ACT_UNSPEC;
	if (!addr_eq(&o.udp[2], (const __u8 *)&t->port, 2) || o.udp[6] || o.udp[7] ||
	    (((__u16)o.udp[4] << 8) | o.udp[5]) != tot - 20)
		return TC_ACT_UNSPEC;
	if (o.vxlan[0] != VXLAN_FLAG_VNI || o.vxlan[1] || o.vxlan[2] || o.vxlan[3] || o.vxlan[7])
		return TC_ACT_UNSPEC;
	vni = ((__u32)o.vxlan[4] << 16) | ((__u32)o.vxlan[5] << 8) | o.vxlan[6];
	parsed = parse_at(skb, &f, INNER_L3);
	if (carrier_check(&f, parsed, outer_be, vni, t, &ep) || !delivered_here(&f, parsed, ep))
		return TC_ACT_UNSPEC;
	inner_proto = bswap16(f.family == 4 ? ETH_P_IP : ETH_P_IPV6);
	/* The outer IP, UDP and VXLAN headers and the inner Ethernet header go; the outer
	 * Ethernet header stays, with the inner packet's type. The segment size of a GSO packet
	 * stays too: it is the inner packet's. A GSO (GRO-merged, or sent whole over veth) packet
	 * also carries UDP-tunnel offload state (skb->encapsulation, SKB_GSO_UDP_TUNNEL) that
	 * should go with the headers, as the VXLAN device clears it: only kernels with
	 * BPF_F_ADJ_ROOM_DECAP_L4_UDP (newer than 6.18) clear it from a program. On older ones
	 * (the flag is refused, the packet untouched) the VXLAN device takes UDP and other GSO
	 * packets, whose receive path segments them by that state (udp_rcv_segment would take a
	 * UDP GSO packet for a tunnel and drop it). TCP GSO packets are decapsulated here all the
	 * same: TCP's receive never segments, and the inner offsets left behind equal the real
	 * headers; only an endpoint that forwards one out of a device with UDP-tunnel TSO of its
	 * own could see it mis-sent (docs/security.md). The checksum state is reset (no
	 * BPF_F_ADJ_ROOM_NO_CSUM_RESET): nothing outer vouches for the inner one. */
	flags = BPF_F_ADJ_ROOM_FIXED_GSO |
		(f.family == 4 ? BPF_F_ADJ_ROOM_DECAP_L3_IPV4 : BPF_F_ADJ_ROOM_DECAP_L3_IPV6);
	if (!skb->gso_size) {
		if (bpf_skb_adjust_room(skb, -ENCAP_LEN, BPF_ADJ_ROOM_MAC, flags) < 0)
			return TC_ACT_UNSPEC;
	} else if (bpf_skb_adjust_room(skb, -ENCAP_LEN, BPF_ADJ_ROOM_MAC,
				       flags | BPF_F_ADJ_ROOM_DECAP_L4_UDP) < 0) {
		if (f.protocol != IPPROTO_TCP ||
		    bpf_skb_adjust_room(skb, -ENCAP_LEN, BPF_ADJ_ROOM_MAC, flags) < 0)
			return TC_ACT_UNSPEC;
	}
	c.ep = ep;
	c.direction = DIR_INGRESS;
	c.flags = EVENT_F_TUNNEL;
	c.src_identity = vni;
	if (bpf_skb_store_bytes(skb, 12, &inner_proto, sizeof(inner_proto), 0) < 0) {
		c.now = bpf_ktime_get_boot_ns();
		return drop(skb, &c, &f, DROP_INVALID, 0);
	}
	return deliver(skb, &c, &f, ep, outer_be);
}

/* At the VXLAN device's egress. Packets from local endpoints come with their tunnel key (set
 * by sigil_from_ep). Without one, only the host's own traffic (routed to a remote pod CIDR)
 * may enter the tunnel, and it leaves as the node: VNI 6 (remote-node at the receiver).
 * Anything the host forwards from elsewhere is refused, so the node is no relay. */
SEC("classifier")
int sigil_to_tunnel(struct __sk_buff *skb)
{
	struct bpf_tunnel_key key = {};
	struct flow f = {};
	struct ctx c = {};
	struct peer p = {};
	struct tunnel_config *t;
	__u32 remote;
	enum parse_result parsed;

	if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) == 0)
		return TC_ACT_OK;
	parsed = parse(skb, &f);
	c.now = bpf_ktime_get_boot_ns();
	c.ep = skb->ifindex;
	c.direction = DIR_EGRESS;
	c.flags = EVENT_F_TUNNEL;
	c.src_identity = IDENTITY_REMOTE_NODE;
	/* The device's own link-scoped chatter (IPv6 router solicitations, MLD) goes nowhere. */
	if (parsed == PARSE_PASS || (f.family == 6 && link_scoped(f.daddr)))
		return TC_ACT_SHOT;
	if (skb->ingress_ifindex != 0)
		return drop(skb, &c, &f, DROP_ENCAP_PROHIBITED, 0);
	t = tunnel_config();
	lookup_peer(f.daddr, f.family, &p);
	c.dst_identity = p.identity;
	remote = remote_endpoint(&p, t);
	if (!remote || !t)
		return drop(skb, &c, &f, DROP_NO_TUNNEL, 0);
	key.tunnel_id = IDENTITY_REMOTE_NODE;
	key.remote_ipv4 = __builtin_bswap32(remote);
	__builtin_memcpy(&key.local_ipv4, t->local_ipv4, 4);
	key.local_ipv4 = __builtin_bswap32(key.local_ipv4);
	key.tunnel_ttl = TUNNEL_TTL;
	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), BPF_F_ZERO_CSUM_TX) < 0)
		return drop(skb, &c, &f, DROP_NO_TUNNEL, 0);
	return TC_ACT_OK;
}
