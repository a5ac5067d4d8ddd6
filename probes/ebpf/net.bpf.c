// asbuilt net probe: whom the traced processes talk to, aggregated in the kernel.
//
// Stable interfaces only: syscall tracepoint arguments (sys_{enter,exit}_{connect,accept,accept4,
// bind}, sys_enter_{listen,sendto,sendmsg}), sock:inet_sock_set_state arguments, helper results and
// user memory read with bpf_probe_read_user (sockaddr and msghdr are userspace ABI: offsets fixed by
// the C library ABI, not by the kernel build). No kernel struct is ever dereferenced.
//
// Each fact is a struct net_key; the first time a key is seen it is sent to userspace once through
// net_events, and every occurrence is counted in net_stats (count, first/last seen, closed TCP
// connections and their summed duration), which userspace reads at drain time.

#include <uapi/linux/ptrace.h>

#define NET_FOLLOW_CHILDREN {{FOLLOW_CHILDREN}}
#define NET_MAX_ENTRIES {{MAX_ENTRIES}}
#define NET_PATH_LEN 108

#define NET_AF_UNIX 1
#define NET_AF_INET 2
#define NET_AF_INET6 10
#define NET_IPPROTO_TCP 6
#define NET_EINPROGRESS 115
#define NET_EALREADY 114
#define NET_EISCONN 106

#define NET_TCP_ESTABLISHED 1
#define NET_TCP_SYN_SENT 2
#define NET_TCP_SYN_RECV 3
#define NET_TCP_CLOSE 7

#define NET_DIR_OUT 1
#define NET_DIR_IN 2
#define NET_DIR_LISTEN 3
#define NET_DIR_BIND 4

#define NET_PROTO_UNKNOWN 0
#define NET_PROTO_TCP 1
#define NET_PROTO_UDP 2
#define NET_PROTO_UNIX 3

#define NET_OP_CONNECT 1
#define NET_OP_ACCEPT 2
#define NET_OP_BIND 3

// One fact. addr/port: the peer for outbound/inbound, the local end for listen/bind.
// lport: our listener's port for inbound. fd: listener fd + 1, only for a listen (or an accept on a
// listener) whose port the kernel side does not know (bound before tracing started, or to port 0);
// userspace resolves it from /proc/PID/fd and teaches net_fd/net_listen_ports.
struct net_key {
    u32 tgid;
    u32 fd;
    s32 error;          // errno of a failed connect/bind, 0 otherwise
    u16 family;
    u16 port;
    u16 lport;
    u8 direction;
    u8 proto;
    u8 addr[16];
    char path[NET_PATH_LEN];  // AF_UNIX path; abstract names start with '@'
};

struct net_stat {
    u64 count;
    u64 first_ns;
    u64 last_ns;
    u64 closed;         // TCP connections of this key seen closing
    u64 duration_ns;    // their summed lifetime
};

struct net_pending {
    struct net_key key;
    u64 uaddr;          // accept: the user sockaddr pointer (may be NULL)
    u64 ulen;           // accept: the user socklen pointer
    u32 fd;
    u8 op;
    u8 pad[3];
};

struct net_sk_val {
    struct net_key key;
    u64 start_ns;
    u64 established;
};

struct net_fd_key {
    u32 tgid;
    u32 fd;
};

BPF_HASH(net_traced, u32, u8, 65536);
BPF_HASH(net_stats, struct net_key, struct net_stat, NET_MAX_ENTRIES);
BPF_HASH(net_pending, u64, struct net_pending, 16384);
BPF_HASH(net_fd, struct net_fd_key, struct net_key, 16384);   // bound sockets: (tgid, fd) -> local end
BPF_HASH(net_listen_ports, u16, u32, 16384);                    // listening port -> tgid
BPF_TABLE("lru_hash", u64, struct net_sk_val, net_sk, 65536);   // TCP socket (skaddr) -> its fact
BPF_PERCPU_ARRAY(net_scratch, struct net_pending, 1);
BPF_ARRAY(net_counters, u64, 4);                                // 0: stats full, 1: pending/fd full
BPF_PERF_OUTPUT(net_events);

static __always_inline void net_count_drop(int which)
{
    u64 *c = net_counters.lookup(&which);
    if (c)
        __sync_fetch_and_add(c, 1);
}

static __always_inline int net_is_traced(u32 tgid)
{
    return net_traced.lookup(&tgid) != 0;
}

static __always_inline struct net_pending *net_scratch_get(void)
{
    int zero = 0;
    struct net_pending *p = net_scratch.lookup(&zero);
    if (p)
        __builtin_memset(p, 0, sizeof(*p));
    return p;
}

// Count one occurrence of *k; the first one is also sent to userspace.
static __always_inline void net_record(void *ctx, struct net_key *k)
{
    u64 now = bpf_ktime_get_ns();
    struct net_stat *s = net_stats.lookup(k);
    if (!s) {
        struct net_stat init = {};
        init.count = 1;
        init.first_ns = now;
        init.last_ns = now;
        if (net_stats.insert(k, &init) == 0) {
            net_events.perf_submit(ctx, k, sizeof(*k));
            return;
        }
        s = net_stats.lookup(k);  // another CPU inserted it first, or the map is full
        if (!s) {
            net_count_drop(0);
            return;
        }
    }
    __sync_fetch_and_add(&s->count, 1);
    s->last_ns = now;
}

// Fill family/addr/port (or path) of *k from a user sockaddr; 0 when it is AF_INET/AF_INET6/AF_UNIX.
static __always_inline int net_read_sockaddr(struct net_key *k, u64 uaddr, int addrlen)
{
    u16 family = 0;
    u16 port = 0;
    if (!uaddr || bpf_probe_read_user(&family, sizeof(family), (void *)uaddr) != 0)
        return -1;
    if (family == NET_AF_INET) {
        bpf_probe_read_user(&port, sizeof(port), (void *)(uaddr + 2));
        bpf_probe_read_user(k->addr, 4, (void *)(uaddr + 4));
    } else if (family == NET_AF_INET6) {
        bpf_probe_read_user(&port, sizeof(port), (void *)(uaddr + 2));
        bpf_probe_read_user(k->addr, 16, (void *)(uaddr + 8));
    } else if (family == NET_AF_UNIX) {
        char first = 0;
        if (addrlen > 2)
            bpf_probe_read_user(&first, 1, (void *)(uaddr + 2));
        if (addrlen > 3 && first == 0) {  // abstract: not NUL-terminated, length from addrlen
            u32 len = ((u32)addrlen - 3) & 127;
            if (len > NET_PATH_LEN - 2)
                len = NET_PATH_LEN - 2;
            k->path[0] = '@';
            if (len > 0)
                bpf_probe_read_user(&k->path[1], len, (void *)(uaddr + 3));
        } else if (addrlen > 2) {
            bpf_probe_read_user_str(k->path, sizeof(k->path), (void *)(uaddr + 2));
        }
    } else {
        return -1;
    }
    k->family = family;
    k->port = ntohs(port);
    return 0;
}

// ---------------------------------------------------------------------------- traced tree
TRACEPOINT_PROBE(sched, sched_process_fork)
{
    if (!NET_FOLLOW_CHILDREN)
        return 0;
    u32 parent = bpf_get_current_pid_tgid() >> 32;
    if (!net_is_traced(parent))
        return 0;
    u32 child = args->child_pid;
    u8 one = 1;
    net_traced.update(&child, &one);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    if (tid != (u32)(id >> 32))
        net_traced.delete(&tid);  // a thread added by the fork hook: not a process
    return 0;
}

// ---------------------------------------------------------------------------- connect
// The entry a syscall's enter left for its exit, when it is of this op (else dropped): NULL if none.
static __always_inline struct net_pending *net_pending_take(u64 id, u8 op)
{
    struct net_pending *p = net_pending.lookup(&id);
    if (p && p->op != op) {
        net_pending.delete(&id);
        return 0;
    }
    return p;
}

// connect and bind entry: the user sockaddr and fd, kept until the syscall returns.
static __always_inline int net_sockaddr_enter(u64 uaddr, int addrlen, u32 fd, u8 direction, u8 op)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (!net_is_traced(tgid))
        return 0;
    struct net_pending *p = net_scratch_get();
    if (!p)
        return 0;
    if (net_read_sockaddr(&p->key, uaddr, addrlen) != 0)
        return 0;
    p->key.tgid = tgid;
    p->key.direction = direction;
    p->key.proto = p->key.family == NET_AF_UNIX ? NET_PROTO_UNIX : NET_PROTO_UNKNOWN;
    p->op = op;
    p->fd = fd;
    if (net_pending.update(&id, p) != 0)
        net_count_drop(1);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_connect)
{
    return net_sockaddr_enter((u64)args->uservaddr, (int)args->addrlen, args->fd, NET_DIR_OUT, NET_OP_CONNECT);
}

TRACEPOINT_PROBE(syscalls, sys_exit_connect)
{
    u64 id = bpf_get_current_pid_tgid();
    struct net_pending *p = net_pending_take(id, NET_OP_CONNECT);
    if (!p)
        return 0;
    long ret = args->ret;
    if (ret == -NET_EALREADY || ret == -NET_EISCONN) {  // re-polling a non-blocking connect
        net_pending.delete(&id);
        return 0;
    }
    p->key.error = (ret == 0 || ret == -NET_EINPROGRESS) ? 0 : (s32)-ret;
    // TCP is known from SYN_SENT seen during the call; a successful inet connect without it is UDP.
    if (p->key.proto == NET_PROTO_UNKNOWN && p->key.error == 0)
        p->key.proto = NET_PROTO_UDP;
    net_record(args, &p->key);
    net_pending.delete(&id);
    return 0;
}

// ---------------------------------------------------------------------------- accept
static __always_inline int net_accept_enter(u64 fd, u64 uaddr, u64 ulen)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (!net_is_traced(tgid))
        return 0;
    struct net_pending *p = net_scratch_get();
    if (!p)
        return 0;
    p->op = NET_OP_ACCEPT;
    p->fd = fd;
    p->uaddr = uaddr;
    p->ulen = ulen;
    if (net_pending.update(&id, p) != 0)
        net_count_drop(1);
    return 0;
}

// Inbound TCP on a known listener is counted by inet_sock_set_state (the peer is in its arguments
// even when the server passes a NULL sockaddr); accept counts the rest: listeners whose port the
// probe does not know, and AF_UNIX listeners.
static __always_inline int net_accept_exit(void *ctx, long ret)
{
    u64 id = bpf_get_current_pid_tgid();
    struct net_pending *p = net_pending.lookup(&id);
    if (!p)
        return 0;
    if (p->op != NET_OP_ACCEPT || ret < 0) {
        net_pending.delete(&id);
        return 0;
    }
    struct net_fd_key fk = {};
    fk.tgid = id >> 32;
    fk.fd = p->fd;
    struct net_key *local = net_fd.lookup(&fk);
    u16 lport = 0;
    if (local && (local->family == NET_AF_INET || local->family == NET_AF_INET6)) {
        lport = local->port;
        if (lport && net_listen_ports.lookup(&lport)) {
            net_pending.delete(&id);
            return 0;  // counted by inet_sock_set_state
        }
    }
    if (local && local->family == NET_AF_UNIX) {
        __builtin_memcpy(&p->key, local, sizeof(p->key));
        p->key.port = 0;
        p->key.fd = 0;
        p->key.proto = NET_PROTO_UNIX;
    } else {
        int alen = 0;
        if (p->ulen)
            bpf_probe_read_user(&alen, sizeof(alen), (void *)p->ulen);
        if (net_read_sockaddr(&p->key, p->uaddr, alen) != 0 || p->key.family == NET_AF_UNIX) {
            net_pending.delete(&id);
            return 0;
        }
        p->key.port = 0;  // the peer's ephemeral port is not part of the fact
        p->key.proto = NET_PROTO_TCP;
        p->key.lport = lport;
        p->key.fd = lport ? 0 : p->fd + 1;  // listener port unknown: userspace resolves fd (+1)
    }
    p->key.tgid = id >> 32;
    p->key.direction = NET_DIR_IN;
    p->key.error = 0;
    net_record(ctx, &p->key);
    net_pending.delete(&id);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_accept4)
{
    return net_accept_enter(args->fd, (u64)args->upeer_sockaddr, (u64)args->upeer_addrlen);
}

TRACEPOINT_PROBE(syscalls, sys_exit_accept4)
{
    return net_accept_exit(args, args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_enter_accept)
{
    return net_accept_enter(args->fd, (u64)args->upeer_sockaddr, (u64)args->upeer_addrlen);
}

TRACEPOINT_PROBE(syscalls, sys_exit_accept)
{
    return net_accept_exit(args, args->ret);
}

// ---------------------------------------------------------------------------- bind / listen
TRACEPOINT_PROBE(syscalls, sys_enter_bind)
{
    return net_sockaddr_enter((u64)args->umyaddr, (int)args->addrlen, args->fd, NET_DIR_BIND, NET_OP_BIND);
}

TRACEPOINT_PROBE(syscalls, sys_exit_bind)
{
    u64 id = bpf_get_current_pid_tgid();
    struct net_pending *p = net_pending_take(id, NET_OP_BIND);
    if (!p)
        return 0;
    long ret = args->ret;
    p->key.error = ret == 0 ? 0 : (s32)-ret;
    net_record(args, &p->key);
    if (ret == 0) {
        struct net_fd_key fk = {};
        fk.tgid = id >> 32;
        fk.fd = p->fd;
        if (net_fd.update(&fk, &p->key) != 0)
            net_count_drop(1);
    }
    net_pending.delete(&id);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_listen)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (!net_is_traced(tgid))
        return 0;
    struct net_pending *p = net_scratch_get();
    if (!p)
        return 0;
    struct net_fd_key fk = {};
    fk.tgid = tgid;
    fk.fd = args->fd;
    struct net_key *local = net_fd.lookup(&fk);
    if (local && (local->family == NET_AF_UNIX || local->port != 0)) {
        __builtin_memcpy(&p->key, local, sizeof(p->key));
        if (local->family != NET_AF_UNIX) {
            u16 port = local->port;
            net_listen_ports.update(&port, &tgid);
            p->key.proto = NET_PROTO_TCP;
        }
    } else {
        // Bound before tracing started, to port 0, or never bound: userspace resolves the fd (+1).
        p->key.fd = args->fd + 1;
    }
    p->key.tgid = tgid;
    p->key.direction = NET_DIR_LISTEN;
    p->key.error = 0;
    net_record(args, &p->key);
    return 0;
}

// ---------------------------------------------------------------------------- datagrams
static __always_inline int net_datagram(void *ctx, u64 uaddr, int addrlen)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (!uaddr || !net_is_traced(tgid))
        return 0;
    struct net_pending *p = net_scratch_get();
    if (!p)
        return 0;
    if (net_read_sockaddr(&p->key, uaddr, addrlen) != 0)
        return 0;
    p->key.tgid = tgid;
    p->key.direction = NET_DIR_OUT;
    p->key.proto = p->key.family == NET_AF_UNIX ? NET_PROTO_UNIX : NET_PROTO_UDP;
    net_record(ctx, &p->key);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_sendto)
{
    return net_datagram(args, (u64)args->addr, (int)args->addr_len);
}

TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg)
{
    u64 msg = (u64)args->msg;
    u64 name = 0;
    int namelen = 0;
    if (!msg)
        return 0;
    bpf_probe_read_user(&name, sizeof(name), (void *)msg);          // msghdr.msg_name
    bpf_probe_read_user(&namelen, sizeof(namelen), (void *)(msg + 8));  // msghdr.msg_namelen
    return net_datagram(args, name, namelen);
}

// ---------------------------------------------------------------------------- TCP lifecycle
TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != NET_IPPROTO_TCP)
        return 0;
    u64 skaddr = (u64)args->skaddr;
    int newstate = args->newstate;
    int oldstate = args->oldstate;
    u64 now = bpf_ktime_get_ns();

    if (newstate == NET_TCP_SYN_SENT) {
        // Process context: the connecting thread, inside its connect() call.
        u64 id = bpf_get_current_pid_tgid();
        struct net_pending *p = net_pending.lookup(&id);
        if (!p || p->op != NET_OP_CONNECT)
            return 0;
        p->key.proto = NET_PROTO_TCP;
        struct net_sk_val *v = (struct net_sk_val *)net_scratch_get();
        if (!v)
            return 0;
        __builtin_memcpy(&v->key, &p->key, sizeof(v->key));
        v->key.error = 0;
        v->start_ns = now;
        net_sk.update(&skaddr, v);
        return 0;
    }
    if (newstate == NET_TCP_ESTABLISHED && oldstate == NET_TCP_SYN_RECV) {
        // Often softirq context: attribute by our listening port.
        u16 lport = args->sport;
        u32 *owner = net_listen_ports.lookup(&lport);
        if (!owner)
            return 0;
        struct net_sk_val *v = (struct net_sk_val *)net_scratch_get();
        if (!v)
            return 0;
        v->key.tgid = *owner;
        v->key.direction = NET_DIR_IN;
        v->key.proto = NET_PROTO_TCP;
        v->key.family = args->family;
        v->key.lport = lport;
        if (args->family == NET_AF_INET)
            __builtin_memcpy(v->key.addr, args->daddr, 4);
        else
            __builtin_memcpy(v->key.addr, args->daddr_v6, 16);
        net_record(args, &v->key);
        v->start_ns = now;
        v->established = 1;
        net_sk.update(&skaddr, v);
        return 0;
    }
    if (newstate == NET_TCP_ESTABLISHED && oldstate == NET_TCP_SYN_SENT) {
        struct net_sk_val *v = net_sk.lookup(&skaddr);
        if (v)
            v->established = 1;
        return 0;
    }
    if (newstate == NET_TCP_CLOSE) {
        struct net_sk_val *v = net_sk.lookup(&skaddr);
        if (!v)
            return 0;
        if (v->established) {
            struct net_stat *s = net_stats.lookup(&v->key);
            if (s) {
                __sync_fetch_and_add(&s->closed, 1);
                __sync_fetch_and_add(&s->duration_ns, now - v->start_ns);
            }
        }
        net_sk.delete(&skaddr);
    }
    return 0;
}
