/* Definitions shared by the sigil TC programs and mirrored in src/abi.rs.
 *
 * This header is the one source of the ABI: build.rs has clang (-target bpf) lay out every
 * struct below and src/abi.rs checks its Rust mirrors against those layouts at compile time
 * (size, alignment, every field's offset and size, no implicit padding).
 *
 * Self-contained on purpose: the build needs clang and nothing else (no libbpf-dev, no
 * kernel headers), and every number here is kernel ABI that does not change. */
#ifndef SIGIL_H
#define SIGIL_H

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef __u16 __be16;
typedef __u32 __be32;

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name
#define __always_inline inline __attribute__((always_inline))

/* enum bpf_map_type */
#define BPF_MAP_TYPE_HASH 1
#define BPF_MAP_TYPE_ARRAY 2
#define BPF_MAP_TYPE_PERCPU_HASH 5
#define BPF_MAP_TYPE_PERCPU_ARRAY 6
#define BPF_MAP_TYPE_LRU_HASH 9
#define BPF_MAP_TYPE_LPM_TRIE 11
#define BPF_MAP_TYPE_RINGBUF 27
#define BPF_F_NO_PREALLOC 1
#define LIBBPF_PIN_BY_NAME 1
#define BPF_ANY 0
#define BPF_NOEXIST 1

#define TC_ACT_UNSPEC (-1) /* not decided here: the next filter on the hook decides */
#define TC_ACT_OK 0
#define TC_ACT_SHOT 2

/* Only the leading fields of struct __sk_buff that the programs read; the verifier checks
 * context accesses by offset, so the tail can be left out. */
struct __sk_buff {
	__u32 len;
	__u32 pkt_type;
	__u32 mark;
	__u32 queue_mapping;
	__u32 protocol;
	__u32 vlan_present;
	__u32 vlan_tci;
	__u32 vlan_proto;
	__u32 priority;
	__u32 ingress_ifindex;
	__u32 ifindex;
	__u32 tc_index;
	__u32 cb[5];
	__u32 hash;
	__u32 tc_classid;
	__u32 data;
	__u32 data_end;
	__u32 napi_id;
	__u32 family;
	__u32 remote_ip4;
	__u32 local_ip4;
	__u32 remote_ip6[4];
	__u32 local_ip6[4];
	__u32 remote_port;
	__u32 local_port;
	__u32 data_meta;
	__u64 flow_keys; /* a pointer in the UAPI, 8-byte aligned */
	__u64 tstamp;
	__u32 wire_len;
	__u32 gso_segs;
	__u64 sk; /* a pointer in the UAPI, 8-byte aligned */
	__u32 gso_size;
};

/* enum bpf_func_id */
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static long (*bpf_map_update_elem)(void *map, const void *key, const void *value,
				   __u64 flags) = (void *)2;
static long (*bpf_map_delete_elem)(void *map, const void *key) = (void *)3;
static __u64 (*bpf_ktime_get_boot_ns)(void) = (void *)125;
static void *(*bpf_ringbuf_reserve)(void *ringbuf, __u64 size, __u64 flags) = (void *)131;
static void (*bpf_ringbuf_submit)(void *data, __u64 flags) = (void *)132;

#define bswap16(x) ((__u16)__builtin_bswap16(x))
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define IPPROTO_ICMP 1
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define IPPROTO_ICMPV6 58
#define IPPROTO_SCTP 132

/* IPv6 extension headers the parser walks through (RFC 8200 section 4). */
#define NEXTHDR_HOP 0
#define NEXTHDR_ROUTING 43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_AUTH 51
#define NEXTHDR_DEST 60

/* ---- sigil ABI (src/abi.rs mirrors every struct below; name every byte, no implicit
 * padding, no bit-fields) ---- */

#define IDENTITY_WORLD 2
#define IDENTITY_REMOTE_NODE 6 /* a cluster node other than this one (Cilium's) */
#define IDENTITY_CLUSTER_MIN 256 /* first identity that is not reserved */
#define IDENTITY_VNI_MAX 0xffffff /* a VNI has 24 bits; node-local identities (bit 24) never fit */
#define DIR_INGRESS 0 /* into the endpoint */
#define DIR_EGRESS 1  /* out of the endpoint */

#define VERDICT_ALLOWED 0
#define VERDICT_DROPPED 1
#define VERDICT_ALLOWED_REPLY 2

#define DROP_INVALID_SIP 132    /* source is not the sender's (endpoint or host) address */
#define DROP_POLICY_DENIED 133 /* no allow entry under default deny */
#define DROP_INVALID 134       /* upper-layer header (ports) missing or truncated */
#define DROP_INVALID_EXTHDR 156 /* IPv6 extension headers not parseable within the bound */
#define DROP_FRAG_NOT_FOUND 175 /* non-first fragment whose first fragment was not seen */
#define DROP_POLICY_DENY 181   /* an explicit deny entry matched */
#define DROP_AUTH_REQUIRED 189 /* allow entry needs auth, none recorded */
#define DROP_NO_TUNNEL_KEY 147 /* a packet on the tunnel device without tunnel metadata */
#define DROP_NO_LOCAL_ENDPOINT 152 /* tunnelled packet for no local endpoint nor this node */
#define DROP_NO_TUNNEL 160 /* no tunnel device, or no tunnel endpoint for the destination */
#define DROP_ENCAP_PROHIBITED 170 /* forwarded (not local) traffic routed into the tunnel */
#define DROP_INVALID_IDENTITY 171 /* VNI 0, reserved, or a node-local identity */
#define DROP_UNKNOWN_SENDER 172 /* tunnel packet whose outer source is not a cluster node */

/* skb->mark from the tunnel device's ingress program to the endpoint's: the high byte says it
 * carries an identity, the low 24 bits are that identity (Cilium's MARK_MAGIC_IDENTITY idea).
 * Trusted only when the packet arrived on the tunnel device (skb->ingress_ifindex). */
#define MARK_MAGIC_MASK 0xff000000
#define MARK_MAGIC_IDENTITY 0x53000000
#define MARK_IDENTITY_MASK 0x00ffffff

/* Events: the packet came from / leaves through the tunnel (identity from / into the VNI). */
#define EVENT_F_TUNNEL 1

struct ipcache_key {
	__u32 prefixlen; /* 32 (family + pad) + address prefix length */
	__u8 family;     /* 4 or 6 */
	__u8 pad[3];
	__u8 addr[16];   /* IPv4 in the first 4 bytes, rest zero */
};

#define IPCACHE_F_TUNNEL 1 /* tunnel_endpoint is set: the address lives on another node */
#define IPCACHE_F_NODE 2   /* the address is a cluster node's underlay address */

struct ipcache_value {
	__u32 identity;
	__u32 flags; /* IPCACHE_F_* */
	__u8 tunnel_endpoint[4]; /* IPv4 underlay address of the hosting node (network order) */
};

/* The single entry of sigil_tunnel: this node's VXLAN device, written by setup_tunnel. */
struct tunnel_config {
	__u32 ifindex; /* the collect-metadata VXLAN device; 0 = no tunnel */
	__u8 local_ipv4[4]; /* this node's underlay address (network order) */
	/* The underlay device the programs encapsulate onto and decapsulate from themselves (same
	 * wire format); 0 = the VXLAN device does both. */
	__u32 underlay_ifindex;
	__be16 port; /* the carrier's UDP port (network order) */
	__u8 pad[2];
};

struct policy_key {
	__u32 prefixlen; /* 72 + (protocol ? 8 : 0) + port prefix bits */
	__u32 endpoint_id;
	__u32 remote_identity; /* 0 = any */
	__u8 direction;
	__u8 protocol; /* 0 = any */
	__be16 dport;
};

struct policy_value {
	__u8 deny;
	__u8 l7_redirect;
	__u8 auth_required;
	__u8 flags;
	__u32 rule_cookie;
};

#define EP_HAS_IPV4 1
#define EP_HAS_IPV6 2

/* The addresses are the only sources the endpoint may send from (besides IPv6 link-local and
 * unspecified ones to link-scoped destinations). */
struct endpoint_config {
	__u8 ingress_enforced;
	__u8 egress_enforced;
	__u8 pad[2];
	__u32 identity;
	__u32 flags; /* EP_HAS_IPV4 | EP_HAS_IPV6 */
	__u8 ipv4[4];
	__u8 ipv6[16];
};

/* Key of sigil_ep_addrs: a local endpoint's own address → its endpoint id (__u32). A packet
 * entering an endpoint with such a source must have come through that endpoint's veth. */
struct ep_addr_key {
	__u8 family; /* 4 or 6 */
	__u8 pad[3];
	__u8 addr[16]; /* IPv4 in the first 4 bytes, rest zero */
};

/* Fragment tracking: the first fragment's flow, for the later fragments of its datagram. */
struct frag_key {
	__u32 endpoint_id;
	__u8 family;
	__u8 direction;
	__u8 nexthdr; /* IPv4 protocol, or the IPv6 fragment header's next header */
	__u8 pad;
	__u32 id;     /* as on the wire (IPv4: 16 bits, then zero) */
	__u8 saddr[16];
	__u8 daddr[16];
};

struct frag_value {
	__u64 seen_ns;
	__u8 protocol;
	__u8 pad;
	__be16 sport;
	__be16 dport;
	__u8 pad2[2];
};

struct auth_key {
	__u32 local_identity;
	__u32 remote_identity;
	__u32 remote_node; /* the peer's node: its underlay IPv4 as the IPCache's tunnel_endpoint
			    * holds it (network order bytes); 0 = this node */
};

struct auth_value {
	__u64 expiry_ns; /* CLOCK_BOOTTIME */
};

struct ct_key {
	__u32 endpoint_id;
	__u8 family;
	__u8 protocol;
	__u8 direction; /* direction of the packet that opened the connection */
	__u8 pad;
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
};

#define CT_SEEN_REPLY 1
#define CT_CLOSING 2

struct ct_value {
	__u64 created_ns;
	__u64 last_seen_ns;
	__u8 flags;
	__u8 pad[7];
};

struct event {
	__u64 ts_ns; /* CLOCK_BOOTTIME */
	__u32 endpoint_id;
	__u32 src_identity;
	__u32 dst_identity;
	__u8 family;
	__u8 protocol;
	__u8 direction;
	__u8 verdict;
	__u16 sport; /* host byte order */
	__u16 dport;
	__u8 saddr[16];
	__u8 daddr[16];
	__u32 drop_reason;
	__u32 rule_cookie;
	__u32 flags; /* EVENT_F_* */
	__u8 tcp_flags;     /* the packet's TCP flags byte (FIN 0x01 ... CWR 0x80); 0 for other protocols */
	__u8 auth_required; /* 1: the deciding allow entry requires authentication */
	__u8 pad[6];        /* zero; every struct here names all its bytes */
};

struct counter_key {
	__u32 endpoint_id;
	__u8 verdict;
	__u8 pad[3];
};

struct counter_value {
	__u64 packets;
	__u64 bytes;
};

#endif
