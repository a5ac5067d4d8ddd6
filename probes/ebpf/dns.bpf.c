// asbuilt dns probe: names the traced processes resolve through the C library, and the answers.
//
// uprobes/uretprobes on getaddrinfo, gethostbyname and gethostbyname2 of the libc the target maps.
// Everything read is user memory of the calling process: the name string, struct addrinfo and struct
// hostent, whose layouts are C library ABI (x86_64/aarch64 LP64, checked with offsetof):
//   struct addrinfo: ai_family @4, ai_addr @24, ai_next @40 (48 bytes)
//   struct hostent:  h_addrtype @16, h_length @20, h_addr_list @24 (32 bytes)
//   sockaddr_in: sin_addr @4; sockaddr_in6: sin6_addr @8
// Facts are (tgid, name, result), deduplicated in the kernel: a new one is sent once through
// dns_events; dns_stats counts every call and keeps the latest answer's addresses.

#include <uapi/linux/ptrace.h>

#define DNS_FOLLOW_CHILDREN {{FOLLOW_CHILDREN}}
#define DNS_MAX_ENTRIES {{MAX_ENTRIES}}
#define DNS_NAME_LEN 128
#define DNS_MAX_ADDRS 8
#define DNS_WALK 24   // addrinfo entries walked (glibc repeats each address per socket type)

#define DNS_AF_INET 2
#define DNS_AF_INET6 10

#define DNS_KIND_GETADDRINFO 1
#define DNS_KIND_GETHOSTBYNAME 2

#define DNS_AI_FAMILY 4
#define DNS_AI_ADDR 24
#define DNS_AI_NEXT 40
#define DNS_H_ADDRTYPE 16
#define DNS_H_ADDR_LIST 24

struct dns_key {
    u32 tgid;
    s32 result;         // getaddrinfo's return (0 or EAI_* < 0); gethostbyname: 0 found, 1 not found
    char name[DNS_NAME_LEN];
};

struct dns_pending {
    struct dns_key key;
    u64 res;            // getaddrinfo: the struct addrinfo ** the caller passed
    u32 kind;
    u32 pad;
};

struct dns_stat {
    u64 count;
    u64 first_ns;
    u64 last_ns;
    u32 naddrs;
    u32 pad;
    u8 family[DNS_MAX_ADDRS];
    u8 addr[DNS_MAX_ADDRS * 16];  // flat: bcc's Python side mis-sizes 2-D arrays
};

BPF_HASH(dns_traced, u32, u8, 65536);
BPF_HASH(dns_pending_calls, u64, struct dns_pending, 16384);
BPF_HASH(dns_stats, struct dns_key, struct dns_stat, DNS_MAX_ENTRIES);
BPF_PERCPU_ARRAY(dns_scratch, struct dns_pending, 1);
BPF_ARRAY(dns_counters, u64, 2);    // 0: stats full, 1: pending full
BPF_PERF_OUTPUT(dns_events);

static __always_inline void dns_count_drop(int which)
{
    u64 *c = dns_counters.lookup(&which);
    if (c)
        __sync_fetch_and_add(c, 1);
}

static __always_inline int dns_enter(u64 name, u64 res, u32 kind)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (!name || !dns_traced.lookup(&tgid))
        return 0;
    int zero = 0;
    struct dns_pending *p = dns_scratch.lookup(&zero);
    if (!p)
        return 0;
    __builtin_memset(p, 0, sizeof(*p));
    if (bpf_probe_read_user_str(p->key.name, sizeof(p->key.name), (void *)name) <= 1)
        return 0;  // unreadable or empty: a passive lookup of a service only
    p->key.tgid = tgid;
    p->res = res;
    p->kind = kind;
    if (dns_pending_calls.update(&id, p) != 0)
        dns_count_drop(1);
    return 0;
}

// Count the call; the stat entry to fill with this answer's addresses (NULL when the map is full).
static __always_inline struct dns_stat *dns_record(struct pt_regs *ctx, struct dns_key *k)
{
    u64 now = bpf_ktime_get_ns();
    struct dns_stat *s = dns_stats.lookup(k);
    if (!s) {
        struct dns_stat init = {};
        init.first_ns = now;
        if (dns_stats.insert(k, &init) == 0)
            dns_events.perf_submit(ctx, k, sizeof(*k));
        s = dns_stats.lookup(k);
        if (!s) {
            dns_count_drop(0);
            return 0;
        }
    }
    __sync_fetch_and_add(&s->count, 1);
    s->last_ns = now;
    return s;
}

static __always_inline u32 dns_store(struct dns_stat *s, u32 n, int family, u64 addr_ptr)
{
    if (n >= DNS_MAX_ADDRS)
        return n;
    u8 a[16] = {};
    if (family == DNS_AF_INET)
        bpf_probe_read_user(a, 4, (void *)addr_ptr);
    else if (family == DNS_AF_INET6)
        bpf_probe_read_user(a, 16, (void *)addr_ptr);
    else
        return n;
    if (n > 0) {  // glibc lists each address once per socket type, one after the other
        u32 prev = (n - 1) & (DNS_MAX_ADDRS - 1);
        u64 *x = (u64 *)a;
        u64 *y = (u64 *)&s->addr[prev * 16];
        if (s->family[prev] == family && x[0] == y[0] && x[1] == y[1])
            return n;
    }
    u32 i = n & (DNS_MAX_ADDRS - 1);
    s->family[i] = family;
    __builtin_memcpy(&s->addr[i * 16], a, 16);
    return n + 1;
}

TRACEPOINT_PROBE(sched, sched_process_fork)
{
    if (!DNS_FOLLOW_CHILDREN)
        return 0;
    u32 parent = bpf_get_current_pid_tgid() >> 32;
    if (!dns_traced.lookup(&parent))
        return 0;
    u32 child = args->child_pid;
    u8 one = 1;
    dns_traced.update(&child, &one);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    if (tid != (u32)(id >> 32))
        dns_traced.delete(&tid);  // a thread added by the fork hook: not a process
    return 0;
}

int dns_getaddrinfo_enter(struct pt_regs *ctx)
{
    return dns_enter(PT_REGS_PARM1(ctx), PT_REGS_PARM4(ctx), DNS_KIND_GETADDRINFO);
}

int dns_gethostbyname_enter(struct pt_regs *ctx)
{
    return dns_enter(PT_REGS_PARM1(ctx), 0, DNS_KIND_GETHOSTBYNAME);
}

int dns_getaddrinfo_return(struct pt_regs *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    struct dns_pending *p = dns_pending_calls.lookup(&id);
    if (!p)
        return 0;
    if (p->kind != DNS_KIND_GETADDRINFO) {
        dns_pending_calls.delete(&id);
        return 0;
    }
    int rc = (int)PT_REGS_RC(ctx);
    p->key.result = rc;
    struct dns_stat *s = dns_record(ctx, &p->key);
    if (s && rc == 0 && p->res) {
        u64 ai = 0;
        u32 n = 0;
        bpf_probe_read_user(&ai, sizeof(ai), (void *)p->res);
        for (int i = 0; i < DNS_WALK; i++) {
            if (!ai)
                break;
            int family = 0;
            u64 sa = 0;
            bpf_probe_read_user(&family, sizeof(family), (void *)(ai + DNS_AI_FAMILY));
            bpf_probe_read_user(&sa, sizeof(sa), (void *)(ai + DNS_AI_ADDR));
            if (sa)
                n = dns_store(s, n, family, sa + (family == DNS_AF_INET ? 4 : 8));
            bpf_probe_read_user(&ai, sizeof(ai), (void *)(ai + DNS_AI_NEXT));
        }
        s->naddrs = n;
    }
    dns_pending_calls.delete(&id);
    return 0;
}

int dns_gethostbyname_return(struct pt_regs *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    struct dns_pending *p = dns_pending_calls.lookup(&id);
    if (!p)
        return 0;
    if (p->kind != DNS_KIND_GETHOSTBYNAME) {
        dns_pending_calls.delete(&id);
        return 0;
    }
    u64 he = PT_REGS_RC(ctx);
    p->key.result = he ? 0 : 1;  // 1: not an EAI_* code, which are <= 0
    struct dns_stat *s = dns_record(ctx, &p->key);
    if (s && he) {
        int family = 0;
        u64 list = 0;
        u32 n = 0;
        bpf_probe_read_user(&family, sizeof(family), (void *)(he + DNS_H_ADDRTYPE));
        bpf_probe_read_user(&list, sizeof(list), (void *)(he + DNS_H_ADDR_LIST));
        for (int i = 0; i < DNS_MAX_ADDRS; i++) {
            u64 addr = 0;
            if (!list)
                break;
            bpf_probe_read_user(&addr, sizeof(addr), (void *)(list + i * 8));
            if (!addr)
                break;
            n = dns_store(s, n, family, addr);
        }
        s->naddrs = n;
    }
    dns_pending_calls.delete(&id);
    return 0;
}
